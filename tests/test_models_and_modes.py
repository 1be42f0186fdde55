"""Models load through from_pretrained; each tuning mode trains and exchanges exactly what it claims."""

from __future__ import annotations

import warnings

import pytest
import torch

import fedsec_bench
from fedsec_bench import load_scenario
from fedsec_bench.data import build_federated_data
from fedsec_bench.data.batching import IGNORE_INDEX, Batcher
from fedsec_bench.evaluation import evaluate
from fedsec_bench.models import BYTE_VOCAB, make_model, make_tokenizer
from fedsec_bench.tuning import TrainableState, apply_tuning

ARCHS = ["gpt2", "llama"]


def build(raw, *overrides):
    scenario = load_scenario(raw, list(overrides))
    data = build_federated_data(scenario)
    tokenizer = make_tokenizer(scenario.model, data.public_texts())
    return scenario, tokenizer, make_model(scenario.model, tokenizer, scenario.seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_building_and_tuning_a_model_raises_no_known_library_warning(tiny, arch):
    """transformers warns "loss_type=None ... unrecognized" on a GPT-2's first loss unless the causal-LM loss is
    named, and PEFT triggers a FutureWarning of transformers': neither is the user's to act on, in the CLI, the
    Python API or a worker alike."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scenario, _, model = build(tiny, f"model.arch={arch}")
        apply_tuning(model, scenario.tuning)
    assert model.loss_type == "ForCausalLM"
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_saved_tiny_model_loads_back_through_from_pretrained(tiny, tmp_path, arch):
    _, tokenizer, model = build(tiny, f"model.arch={arch}")
    folder = tmp_path / f"tiny-{arch}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tiny["model"] = {"name_or_path": str(folder)}  # tokenizer kind auto -> the model's own
    result = fedsec_bench.run(tiny)
    loaded = load_scenario(tiny)
    _, loaded_tok, loaded_model = build(tiny)
    assert loaded.model.name_or_path == str(folder)
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert loaded_model.config.model_type == model.config.model_type
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded_model.state_dict().items()):
        assert a.equal(b), name
    assert result.metrics["utility.eval_loss"].notna().all()


def test_byte_tokenizer_has_one_symbol_per_byte(tiny):
    _, tokenizer, model = build(tiny, "model.tokenizer.kind=byte")
    assert len(tokenizer) == BYTE_VOCAB
    ids = tokenizer("café 42", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("café 42".encode()) and tokenizer.decode(ids) == "café 42"
    assert model.get_input_embeddings().num_embeddings == BYTE_VOCAB


@pytest.mark.parametrize("format", ["text", "instruction"])
def test_bpe_tokenizer_is_trained_on_the_public_split_only(tiny, format):
    scenario, tokenizer, _ = build(tiny, "data.canaries.count=4", "model.tokenizer.vocab_size=400", f"data.format={format}")
    data = build_federated_data(scenario)
    learned = {t for t in tokenizer.get_vocab() if len(t) > 1}
    public_text = " ".join(data.public_texts())
    # every merge was seen in the public split; client data and canary secrets never shaped it
    assert all(tokenizer.convert_tokens_to_string([t]) in public_text for t in learned if t != "<|endoftext|>")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["full", "lora", "prompt"])
def test_each_mode_exchanges_only_its_trainable_parameters(tiny, arch, mode):
    scenario, _, model = build(tiny, f"model.arch={arch}", f"tuning.mode={mode}")
    total = sum(p.numel() for p in model.parameters())
    trainable = TrainableState(apply_tuning(model, scenario.tuning))
    names = list(trainable.params)
    if mode == "full":
        assert trainable.num_values() == total
    elif mode == "lora":
        assert names and all("lora_" in n for n in names) and trainable.num_values() < total / 5
    else:
        assert names == ["prompt_encoder.default.embedding.weight"]
        assert trainable.num_values() == scenario.tuning.prompt.num_virtual_tokens * scenario.model.hidden


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["full", "lora", "prompt"])
def test_held_out_loss_is_the_models_own_loss_on_the_same_tokens(tiny, arch, mode):
    """utility.eval_loss is the token-mean loss the model itself computes from labels, over
    every token but each text's first. Under prompt tuning PEFT's own loss also predicts
    the first token from the soft prompt; utility leaves it out, so every mode scores the
    same tokens."""
    scenario, tokenizer, model = build(tiny, f"model.arch={arch}", f"tuning.mode={mode}")
    model = apply_tuning(model, scenario.tuning).eval()
    texts = build_federated_data(scenario).heldout
    batcher = Batcher(tokenizer, scenario.data.seq_len, batch_size=len(texts))  # one batch: one token mean
    batch = batcher.collate(batcher.encode(texts))
    batch["labels"][:, 0] = IGNORE_INDEX
    with torch.no_grad():
        own = model(**batch).loss.item()
    utility = evaluate(model, batcher.loader(texts), torch.device("cpu"))
    assert utility["utility.eval_loss"] == pytest.approx(own, rel=1e-5)


@pytest.mark.parametrize("mode", ["full", "lora", "prompt"])
def test_each_mode_learns_and_reports_bytes_sent(tiny, pretrained_tiny, mode):
    """Fine-tuning a pretrained model on the clients' (topic-skewed) data improves held-out loss."""
    tiny["model"] = {"name_or_path": pretrained_tiny}
    tiny["tuning"] = {"mode": mode, "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]}}
    tiny["federation"].update(rounds=3, local_steps=5, lr={"full": 0.003, "lora": 0.01, "prompt": 0.1}[mode])
    tiny["eval"] = {"max_examples": "all"}  # every held-out example: the improvement is small at this size
    result = fedsec_bench.run(tiny)
    loss = result.metrics["utility.eval_loss"]
    assert loss.iloc[-1] < loss.iloc[0] - 0.02, loss.tolist()  # utility improves over rounds
    assert (loss.iloc[1:] < loss.iloc[0]).all(), loss.tolist()  # and every round beats the start
    scenario = load_scenario(tiny)
    _, _, model = build(tiny, f"tuning.mode={mode}")
    values = TrainableState(apply_tuning(model, scenario.tuning)).num_values()
    assert result.final["cost.bytes_up"] == 4 * values  # float32 per exchanged value


def test_federated_pretraining_from_scratch_in_full_mode(tiny):
    tiny["tuning"] = {"mode": "full"}
    tiny["federation"].update(rounds=5, local_steps=8, lr=0.005)
    loss = fedsec_bench.run(tiny).metrics["utility.eval_loss"]
    assert loss.iloc[-1] < 0.7 * loss.iloc[0]  # a random model learns the corpus's statistics


def test_pretraining_on_the_public_split_gives_fine_tuning_a_head_start(tiny):
    cold = fedsec_bench.run(tiny).metrics["utility.eval_loss"].iloc[0]
    warm = fedsec_bench.run(tiny, ["model.pretrain.steps=60"]).metrics["utility.eval_loss"].iloc[0]
    assert warm < cold - 1.0  # round 0 is before any client trained
