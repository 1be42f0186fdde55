"""Prompt/response data: formats, templates, the response-only loss, natural per-user splits, real files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fedsec_bench import ScenarioError, load_scenario
from fedsec_bench.data import build_federated_data, instruction_example, text_example
from fedsec_bench.data.batching import IGNORE_INDEX, Batcher
from fedsec_bench.data.templates import PromptRenderer, render_builtin
from fedsec_bench.models import train_byte_level_bpe


def data_for(raw, *overrides):
    return build_federated_data(load_scenario(raw, list(overrides)))


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_level_bpe(["### User:\nwhat is the weather ?\n\n### Assistant:\nthe rain lingers ."] * 4, 300)


def test_prompt_tokens_are_masked_out_of_the_loss_unless_train_on_prompt(tokenizer):
    example = instruction_example("what is the weather ?", "the rain lingers .")
    prompt = tokenizer(render_builtin(example.prompt), add_special_tokens=False)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batch = Batcher(tokenizer, 64, 2).collate(Batcher(tokenizer, 64, 2).encode([example, text_example("rain .")]))
    assert batch["input_ids"][0, : len(prompt) + len(response)].tolist() == prompt + response
    labels = batch["labels"][0]
    assert (labels[: len(prompt)] == IGNORE_INDEX).all()
    assert labels[len(prompt) : len(prompt) + len(response)].tolist() == response
    assert (batch["labels"][1][: batch["attention_mask"][1].sum()] != IGNORE_INDEX).all()  # plain text: every token

    with_prompt = Batcher(tokenizer, 64, 2, train_on_prompt=True)
    labels = with_prompt.collate(with_prompt.encode([example]))["labels"][0]
    assert labels.tolist() == prompt + response


def test_a_pair_longer_than_seq_len_loses_the_start_of_its_prompt(tokenizer):
    example = instruction_example("a very long instruction " * 10, "the rain lingers .")
    batcher = Batcher(tokenizer, 24, 1)
    prompt = tokenizer(render_builtin(example.prompt), add_special_tokens=False)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    (encoded,) = batcher.encode([example])
    assert encoded.truncated and len(encoded.ids) == 24
    assert encoded.ids == prompt[-(24 - len(response)) :] + response  # the response is whole, the prompt's end kept
    assert encoded.prompt_tokens == 24 - len(response)
    (short,) = batcher.encode([instruction_example("hi", "ok")])
    assert not short.truncated


def test_the_tokenizers_chat_template_renders_the_prompt_when_it_has_one(tokenizer):
    example = instruction_example("what is the weather ?", "rain .", input="in the north")
    assert PromptRenderer(tokenizer).render(example) == (
        "### User:\nwhat is the weather ?\n\nin the north\n\n### Assistant:\n"
    )
    templated = train_byte_level_bpe(["hello"], 300)
    templated.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert PromptRenderer(templated).render(example) == "<|user|>what is the weather ?\n\nin the north\n<|assistant|>"
    assert PromptRenderer(templated).render(text_example("plain")) == ""


def test_the_synthetic_instruction_corpus_has_the_guarantees_of_the_text_one(tiny):
    tiny["data"].update(format="instruction", examples_per_client=50, heldout_examples=100, public_examples=100)
    data, again = data_for(tiny), data_for(tiny)
    assert data.pool == again.pool and data.heldout == again.heldout and data.canaries == again.canaries
    assert all(e.is_prompted and e.response for e in data.pool + data.heldout + data.public)
    assert not set(data.heldout) & set(data.pool)
    assert not set(data.public) & (set(data.pool) | set(data.heldout))
    for canary in data.canaries:  # a question whose answer is the secret, held by its client only
        assert canary.example.instruction.endswith("?") and canary.example.response == canary.secret + " ."
        assert data.client_examples(canary.client_id).count(canary.example) == canary.repetitions
    assert any(e.instruction.startswith("repeat the note") and e.response in e.instruction for e in data.pool)


def test_topic_skew_reaches_instruction_data(tiny):
    tiny["data"].update(format="instruction", examples_per_client=100, partition={"method": "dirichlet", "alpha": 0.05})
    data = data_for(tiny)
    topics_of = [{(e.instruction + e.response).split()[3] for e in data.client_examples(c)} for c in range(4)]
    assert len(data.pool) == 400 and min(len(t) for t in topics_of) >= 1


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def alpaca_rows(users=9, per_user=(3, 5, 8, 2, 12, 4, 6, 3, 7)):
    return [
        {"instruction": f"question {u}-{i} ?", "input": "" if i % 2 else f"context {i}", "output": f"answer {u}-{i} .",
         "user": f"u{u}"}
        for u in range(users) for i in range(per_user[u])
    ]


def files_scenario(tiny, path, **data):
    tiny["data"] = {"source": "files", "path": path, "format": "instruction", "heldout_examples": 4,
                    "public_examples": 2, **data}
    return tiny


def test_alpaca_jsonl_becomes_instruction_examples_with_their_input(tiny, tmp_path):
    rows = alpaca_rows()
    data = data_for(files_scenario(tiny, write_jsonl(tmp_path / "a.jsonl", rows)))
    every = data.members() + data.heldout + data.public
    assert len(every) == len(rows) and not data.canaries  # nothing planted into a file source unless asked
    by_response = {e.response: e for e in every}
    assert by_response["answer 0-0 ."].instruction == "question 0-0 ?\n\ncontext 0"
    assert by_response["answer 0-1 ."].instruction == "question 0-1 ?"


def test_instruction_fields_are_named_in_the_scenario_and_errors_name_them(tiny, tmp_path):
    rows = [{"q": r["instruction"], "a": r["output"]} for r in alpaca_rows()]
    path = tmp_path / "qa.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    data = data_for(files_scenario(tiny, str(path), instruction_field="q", output_field="a"))
    assert {e.response for e in data.members()} <= {r["a"] for r in rows}
    with pytest.raises(ScenarioError, match="data.output_field: no column 'output'"):
        data_for(files_scenario(tiny, str(path), instruction_field="q"))


def test_chat_records_take_the_last_assistant_message_as_the_response(tiny, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": f"hello {i}"}]} for i in range(30)]
    path = tmp_path / "chat.parquet"
    pd.DataFrame(rows).to_parquet(path)
    data = data_for(files_scenario(tiny, str(path), format="chat"))
    example = next(e for e in data.members() if e.response == "hello 3")
    assert example.prompt == (("system", "be brief"), ("user", "hi 3"))
    bad = [{"messages": [{"role": "user", "content": "hi"}]}] * 30
    with pytest.raises(ScenarioError, match=r"data.messages_field: row 0: the last message must be the assistant"):
        data_for(files_scenario(tiny, write_jsonl(tmp_path / "bad.jsonl", bad), format="chat"))


def test_a_datasets_builder_reads_a_local_instruction_file(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    tiny["data"] = {"source": "datasets", "path": "json", "data_files": path, "format": "instruction",
                    "heldout_examples": 4, "public_examples": 2}
    data = data_for(tiny)
    assert sorted(e.response for e in data.members() + data.heldout + data.public) == sorted(
        r["output"] for r in alpaca_rows())


def test_synthetic_only_fields_are_refused_for_file_sources(tiny, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    for field, value in (("topics", 3), ("examples_per_client", 10), ("difficulty", "mixed")):
        with pytest.raises(ScenarioError, match=f"data.{field} shapes the synthetic corpus only"):
            load_scenario(files_scenario(tiny, path, **{field: value}))


def test_natural_partition_gives_one_client_per_user_largest_first(tiny, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    scenario = files_scenario(tiny, path, partition={"method": "natural", "by": "user", "min_examples": 2},
                              heldout_by_user=True)
    data = data_for(scenario)
    users_of = [{e.response.split()[1].split("-")[0] for e in data.client_examples(c)} for c in range(4)]
    assert all(len(u) == 1 for u in users_of)  # every client is one user
    sizes = [len(data.client_examples(c)) for c in range(4)]
    assert sizes == sorted(sizes, reverse=True)
    heldout_users = {e.response.split()[1].split("-")[0] for e in data.heldout}
    assert not heldout_users & set().union(*users_of)  # whole users held out: no user on both sides
    assert data.users == [f"u{next(iter(u))}" for u in users_of]


def test_natural_partition_refuses_too_few_users_and_can_sample(tiny, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    natural = {"method": "natural", "by": "user", "min_examples": 10}
    with pytest.raises(ScenarioError, match=r"found 1 users with ≥ 10 client records \(of 9 users\); set federation.num_clients ≤ 1"):
        data_for(files_scenario(tiny, path, partition=natural), "federation.num_clients=4")
    sampled = data_for(files_scenario(tiny, path, partition={**natural, "min_examples": 1, "select": "random"}),
                       "federation.num_clients=3", "federation.clients_per_round=2")
    assert len(sampled.users) == 3 and sampled.counts["data.users_left_out"] == 6
    with pytest.raises(ScenarioError, match="data.partition.by: no column 'sender'"):
        data_for(files_scenario(tiny, path, partition={"method": "natural", "by": "sender"}))


def test_duplicates_never_sit_on_both_sides_and_are_counted(tiny, tmp_path):
    rows = [{"text": f"line {i % 20} ."} for i in range(60)]  # every text three times
    tiny["data"] = {"source": "files", "path": write_jsonl(tmp_path / "d.jsonl", rows), "heldout_examples": 4,
                    "public_examples": 2}
    grouped = data_for(tiny)
    assert not set(grouped.heldout) & set(grouped.pool) and not set(grouped.public) & set(grouped.pool)
    assert len(grouped.pool) + len(grouped.heldout) + len(grouped.public) == 60
    dropped = data_for(tiny, "data.duplicates=drop")
    assert dropped.counts["data.duplicate_records"] == 40 and len(set(dropped.pool)) == len(dropped.pool)


def test_clients_can_be_capped(tiny, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    data = data_for(files_scenario(tiny, path, partition={"method": "natural", "by": "user"},
                                   max_examples_per_client=3))
    assert max(len(data.client_examples(c)) for c in range(4)) == 3 and data.counts["data.capped_examples"] > 0


def test_long_texts_are_chunked_or_truncated_and_counted(tiny, tmp_path):
    from fedsec_bench.runner import run

    rows = [{"text": " ".join(f"word{j}" for j in range(i, i + 40))} for i in range(40)]
    tiny["data"] = {"source": "files", "path": write_jsonl(tmp_path / "long.jsonl", rows), "heldout_examples": 4,
                    "public_examples": 4, "seq_len": 16}
    tiny["federation"]["rounds"] = 1
    truncated = run(tiny).metrics.iloc[0]
    assert truncated["data.truncated_examples"] == 36
    chunked = run(tiny, ["data.long_texts=chunk"]).metrics.iloc[0]
    assert chunked["data.chunked_texts"] == 32 and chunked["data.truncated_examples"] <= 4


def test_a_run_on_instruction_data_logs_answer_quality_and_data_counts(tiny):
    from fedsec_bench.runner import run

    tiny["data"].update(format="instruction", seq_len=48)
    tiny["eval"] = {"max_examples": 8, "generation_examples": 4, "max_new_tokens": 8}
    result = run(tiny)
    first, last = result.metrics.iloc[0], result.metrics.iloc[-1]
    data = build_federated_data(result.scenario)
    from fedsec_bench.models import make_tokenizer

    unbounded = Batcher(make_tokenizer(result.scenario.model, data.public_texts()), 10**6, 1)
    longer = sum(len(e.ids) > 48 for e in unbounded.encode(data.members() + data.heldout))
    assert longer > 0 and first["data.truncated_examples"] == longer
    for name in ("utility.rougeL", "utility.exact_match", "utility.eval_loss"):
        assert 0 <= last[name] < float("inf")


def test_answer_quality_is_high_for_a_model_that_learned_the_answers_and_low_before(tiny):
    """Greedy answers scored against the references: ~1 after training on exactly those pairs, ~0 untrained."""
    from fedsec_bench.client import LocalTraining
    from fedsec_bench.evaluation import answer_quality
    from fedsec_bench.models import make_model, make_tokenizer

    tiny["model"]["max_positions"] = 192
    tiny["data"].update(format="instruction", seq_len=128)
    scenario = load_scenario(tiny)
    data = build_federated_data(scenario)
    tokenizer = make_tokenizer(scenario.model, data.public_texts())
    model = make_model(scenario.model, tokenizer, 0)
    batcher = Batcher(tokenizer, 128, 4)
    answered = data.heldout[:4]
    assert not any(e.truncated for e in batcher.encode(answered))
    cpu = torch.device("cpu")
    before = answer_quality(model, batcher, answered, 48, 4, cpu)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    LocalTraining(model, optimizer, batcher.loader(answered, seed=0), 150, cpu).run()
    after = answer_quality(model, batcher, answered, 48, 4, cpu)
    assert before["utility.exact_match"] == 0 and before["utility.rougeL"] < 0.5
    assert after["utility.exact_match"] == 1.0 and after["utility.rougeL"] == pytest.approx(1.0)


def test_evaluation_reads_a_bounded_slice_of_the_held_out_split(tiny):
    from fedsec_bench.runtime import build_runtime

    tiny["data"].update(format="instruction", seq_len=48, heldout_examples=40)
    tiny["eval"] = {"max_examples": 10, "batch_size": 4, "generation_examples": 3}
    scenario = load_scenario(tiny)
    runtime = build_runtime(scenario, build_federated_data(scenario), torch.device("cpu"), tmp_artifacts(tiny))
    assert len(runtime.eval_loader.dataset) == 10 and runtime.eval_loader.batch_size == 4
    assert runtime.answered == runtime.data.heldout[:3]


def tmp_artifacts(tiny):
    from pathlib import Path

    folder = Path(tiny["tracking"]["output_dir"]) / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_validate_reads_the_data_and_refuses_what_run_would(tiny, tmp_path):
    import yaml

    from fedsec_bench.cli import main

    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    scenario_file = tmp_path / "s.yaml"
    scenario_file.write_text(yaml.safe_dump(files_scenario(tiny, "a.jsonl")))  # relative to the scenario file
    assert main(["validate", str(scenario_file)]) == 0
    assert main(["validate", str(scenario_file), "--set", "data.output_field=answer"]) == 2
    assert main(["validate", str(scenario_file), "--set", f"data.path={path}.missing"]) == 2


def test_the_readmes_bring_your_own_scenario_runs_on_a_local_checkpoint_and_jsonl(tiny, tmp_path, pretrained_tiny):
    """The README's five lines, as written, with its two paths pointing at a tiny saved checkpoint and a jsonl."""
    import shutil
    from pathlib import Path

    import yaml

    from fedsec_bench.cli import main

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Bring your own model and data", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    raw = yaml.safe_load(block)
    assert raw["model"]["name_or_path"] == "./my-checkpoint" and raw["data"]["path"] == "train.jsonl"
    shutil.copytree(pretrained_tiny, tmp_path / "my-checkpoint")
    rows = [{"instruction": f"question {u}-{i} ?", "input": "", "output": f"answer {u}-{i} .", "user": f"u{u}"}
            for u in range(12) for i in range(6)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "mine.yaml").write_text(block)
    quick = ["--set", "federation.rounds=1", "--set", "data.heldout_examples=12", "--set", "federation.local_steps=1", "--set", "data.seq_len=48",
             "--set", "tracking.enabled=false", "--set", "eval.generation_examples=2", "--set", "eval.max_new_tokens=4"]
    assert main(["validate", str(tmp_path / "mine.yaml"), *quick]) == 0
    assert main(["run", str(tmp_path / "mine.yaml"), "--quiet", *quick]) == 0
    assert list((tmp_path / "fedsec-runs" / "mine").glob("*/summary.json"))
