"""A corpus of bad input, each refused the way a user relies on: exit 2, every error line starting with
the field to fix, no traceback, a bounded message, in well under a second, and nothing recorded.

Each case is one scenario file, ``--set`` override or data file a user (or an attacker writing a
scenario for someone else's CI) could hand to ``fedsec validate``; a few go through ``fedsec run``
and ``fedsec sweep --dry-run`` too. ``{ckpt}``, ``{short}``, ``{files}`` and ``{tmp}`` in a case
stand for the fixtures' folders.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from pathlib import Path

import pytest
import yaml

from fedsec_bench.cli import main

from conftest import TINY

LOL = ", ".join(['"lol"'] * 9)
BOMB = "[&a [" + LOL + "], " + ", ".join(
    f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")
) + "]"
"""A billion laughs (9**9 strings from about 480 bytes) as one flow value: every anchor lives inside it."""
MERGE_BOMB = "[&a {x0: 1, x1: 1, x2: 1, x3: 1}, " + ", ".join(
    f"&{b} {{<<: [{', '.join([f'*{a}'] * 8)}], y{b}: 1}}" for a, b in zip("abcdefgh", "bcdefghi")
) + "]"
"""The same through merge keys, which PyYAML flattens by copying."""


def case(id: str, expect: str, *sets: str, text: str | None = None, edit=None, command: str = "validate"):
    """One bad input: ``sets`` (--set overrides), ``text`` (the whole scenario file, tiny's YAML when None)
    or ``edit`` (a change to tiny's dict); ``expect``: how an error line starts (the field it names)."""
    return pytest.param(expect, list(sets), text, edit, command, id=id)


def files_source(raw: dict) -> None:
    """Tiny scenario reading local files instead of the synthetic corpus (whose own fields go)."""
    raw["data"].pop("examples_per_client")
    raw["data"].update({"source": "files", "heldout_examples": 8, "canaries": {"count": 0}})


def with_files(name: str, **data):
    def edit(raw: dict) -> None:
        files_source(raw)
        raw["data"].update({"path": "{files}/" + name, **data})
    return edit


def loaded(raw: dict) -> None:
    """Tiny scenario loading a checkpoint (name_or_path set by the case) with its own tokenizer."""
    raw["model"] = {"name_or_path": "{ckpt}"}


def top(text: str) -> str:
    """Tiny's YAML with ``text`` as its last lines (a later key of the same name is refused as a duplicate)."""
    return yaml.safe_dump(TINY, sort_keys=False) + text


SETS = [
    case("set-subfield-of-str", "--set name.x", "name.x=1"),
    case("set-subfield-of-int", "--set seed.a", "seed.a.b=1"),
    case("set-subfield-of-number-in-section", "--set model.layers.0", "model.layers.0=1"),
    case("set-empty-path", "--set =1", "=1"),
    case("set-blank-path", "--set ", "  =3"),
    case("set-double-dot", "--set a..b", "a..b=1"),
    case("set-only-dot", "--set .", ".=1"),
    case("set-trailing-dot", "--set federation.", "federation.=1"),
    case("set-no-equals", "--set federation.rounds", "federation.rounds"),
    case("set-index-out-of-range", "--set data.canaries.repetitions.7", "data.canaries.repetitions.7=1"),
    case("set-index-into-empty-list", "--set attacks.5.name", "attacks.5.name=x"),
    case("set-index-bracket-out-of-range", "--set defenses[3].max_norm", "defenses[3].max_norm=1"),
    case("set-word-index", "--set data.canaries.repetitions.x", "data.canaries.repetitions.x=1"),
    case("set-unicode-digit-index", "--set data.canaries.repetitions.²", "data.canaries.repetitions.²=1"),
    case("set-huge-index", "--set data.canaries.repetitions." + "9" * 30, "data.canaries.repetitions." + "9" * 30 + "=1"),
    case("set-bad-yaml", "--set federation.rounds: not valid YAML", "federation.rounds=["),
    case("set-undefined-alias", "--set name: not valid YAML", "name=*a"),
    case("set-recursive-alias", "defenses[0]: an alias refers", "defenses=&a [*a]"),
    case("set-alias-bomb", "model.dtype: expands", "model.dtype=" + BOMB),
    case("set-deep-nesting", "defenses", "defenses=" + "[" * 200 + "]" * 200),
    case("set-unknown-long-key", "x" * 39 + "…: unknown field", "x" * 5000 + "=1"),
    case("set-huge-int", "--set seed: not valid YAML", "seed=" + "9" * 5000),
    case("set-python-tag", "--set name: not valid YAML", "name=!!python/object/apply:os.system [ls]"),
    case("set-binary-tag", "--set name: not valid YAML", "name=!!binary aGVsbG8="),
    case("set-section-to-scalar", "model: ", "model=5"),
]

BOUNDS = [
    case("vocab-size-1e9", "model.tokenizer.vocab_size: must be ≤", "model.tokenizer.vocab_size=1000000000"),
    case("model-vocab-1e9", "model.vocab: must be ≤", "model.vocab=1000000000"),
    case("seq-len-1e9", "data.seq_len: must be ≤", "data.seq_len=1000000000"),
    case("max-positions-1e9", "model.max_positions: must be ≤", "model.max_positions=1000000000"),
    case("hidden-1e7", "model.hidden: must be ≤", "model.hidden=10000000"),
    case("layers-1e6", "model.layers: must be ≤", "model.layers=1000000"),
    case("heads-1e6", "model.heads: must be ≤", "model.heads=1000000"),
    case("intermediate-1e9", "model.intermediate: must be ≤", "model.arch=llama", "model.intermediate=1000000000"),
    case("built-params-over-bound", "model: the model these sizes build", "model.hidden=65536", "model.layers=100",
         "model.heads=64"),
    case("num-clients-1e9", "federation.num_clients: must be ≤", "federation.num_clients=1000000000"),
    case("examples-per-client-1e9", "data.examples_per_client: must be ≤", "data.examples_per_client=1000000000"),
    case("synthetic-records-over-bound", "data: the synthetic corpus would draw", "federation.num_clients=100000",
         "data.examples_per_client=100"),
    case("heldout-1e9", "data.heldout_examples: must be ≤", "data.heldout_examples=1000000000"),
    case("public-1e9", "data.public_examples: must be ≤", "data.public_examples=1000000000"),
    case("canary-count-1e9", "data.canaries.count: must be ≤", "data.canaries.count=1000000000"),
    case("canary-repetitions-1e9", "data.canaries.repetitions[0]: must be ≤", "data.canaries.repetitions=[1000000000]"),
    case("canary-copies-over-bound", "data.canaries: ", "data.canaries.count=100000", "data.canaries.repetitions=[100]"),
    case("rounds-1e9", "federation.rounds: must be ≤", "federation.rounds=1000000000"),
    case("local-steps-1e9", "federation.local_steps: must be ≤", "federation.local_steps=1000000000"),
    case("local-epochs-1e9", "federation.local_epochs: must be ≤", "federation.local_epochs=1000000000"),
    case("batch-size-1e9", "federation.batch_size: must be ≤", "federation.batch_size=1000000000"),
    case("grad-accumulation-1e9", "federation.grad_accumulation: must be ≤", "federation.grad_accumulation=1000000000"),
    case("lora-rank-1e9", "tuning.lora.r: must be ≤", "tuning.lora.r=1000000000"),
    case("virtual-tokens-1e9", "tuning.prompt.num_virtual_tokens: must be ≤", "tuning.prompt.num_virtual_tokens=1000000000"),
    case("max-new-tokens-1e9", "eval.max_new_tokens: must be ≤", "eval.max_new_tokens=1000000000"),
    case("eval-batch-1e9", "eval.batch_size: must be ≤", "eval.batch_size=1000000000"),
    case("eval-examples-1e9", "eval.max_examples: ", "eval.max_examples=1000000000"),
    case("pretrain-steps-1e12", "model.pretrain.steps: must be ≤", "model.pretrain.steps=1000000000000"),
    case("min-examples-1e9", "data.partition.min_examples: must be ≤", "data.partition.min_examples=1000000000"),
    case("seed-negative", "seed: must be ≥ 0", "seed=-1"),
    case("seed-over-64-bits", "seed: must be ≤", "seed=18446744073709551616"),
    case("name-too-long", "name: ", "name=" + "n" * 1000),
    case("topics-over-corpus", "data.topics: must be ≤", "data.topics=9"),
]

SCHEMA = [
    case("rounds-string", "federation.rounds: ", "federation.rounds=abc"),
    case("rounds-float", "federation.rounds: ", "federation.rounds=1.5"),
    case("rounds-zero", "federation.rounds: must be ≥ 1", "federation.rounds=0"),
    case("rounds-list", "federation.rounds: ", "federation.rounds=[1]"),
    case("lr-inf", "federation.lr: ", "federation.lr=.inf"),
    case("lr-nan", "federation.lr: ", "federation.lr=.nan"),
    case("lr-overflow", "federation.lr: ", "federation.lr=1.0e+999"),
    case("lr-negative", "federation.lr: must be > 0", "federation.lr=-1"),
    case("dtype-unknown", "model.dtype: got 'float64'", "model.dtype=float64"),
    case("mode-unknown", "tuning.mode: ", "tuning.mode=foo"),
    case("device-unknown", "device: ", "device=tpu"),
    case("source-unknown", "data.source: ", "data.source=foo"),
    case("partition-unknown", "data.partition.method: ", "data.partition.method=foo"),
    case("canary-kind-unknown", "data.canaries.kinds[0]: ", "data.canaries.kinds=[ssn]"),
    case("canary-client-not-a-client", "data.canaries.clients: ", "data.canaries.clients=[99]"),
    case("canary-client-negative", "data.canaries.clients[0]: must be ≥ 0", "data.canaries.clients=[-1]"),
    case("custom-canary-mismatch", "data.canaries.custom[0]: secret '12a4' does not match",
         "data.canaries.custom=[{text: 'pin {secret}', secret: '12a4', format: '####'}]"),
    case("custom-canary-no-slot", "data.canaries.custom[0]: ",
         "data.canaries.custom=[{text: 'pin {secret}', secret: 'ab', format: 'ab'}]"),
    case("custom-canary-huge-secret", "data.canaries.custom[0]: ",
         "data.canaries.custom=[{text: 'pin {secret}', secret: '" + "1" * 100000 + "', format: '####'}]"),
    case("heldout-one", "data.heldout_examples: must be ≥ 2", "data.heldout_examples=1"),
    case("public-zero-with-bpe", "data.public_examples: 0", "data.public_examples=0"),
    case("clients-per-round-over", "federation.clients_per_round (9) must be ≤", "federation.clients_per_round=9"),
    case("seq-len-over-positions", "data.seq_len (32) exceeds model.max_positions", "model.max_positions=16"),
    case("prompt-over-positions", "data.seq_len (32) + tuning.prompt", "tuning.mode=prompt",
         "tuning.prompt.num_virtual_tokens=40"),
    case("hidden-not-divisible", "model.hidden (33) must be divisible", "model.hidden=33"),
    case("kv-heads-not-divisor", "model.kv_heads: 3 does not divide", "model.arch=llama", "model.heads=4",
         "model.kv_heads=3"),
    case("both-sources", "model: set exactly one", "model.name_or_path=gpt2"),
    case("no-model", "model: set exactly one", "model.arch=null"),
    case("target-modules-empty", "tuning.lora.target_modules: ", "tuning.lora.target_modules=[]"),
    case("target-modules-not-found", "tuning.lora.target_modules: PEFT refused", "tuning.lora.target_modules=[nope]"),
    case("model-vocab-below-tokenizer", "model.vocab: 100 is below", "model.vocab=100"),
    case("unknown-field-typo", "federation.roundz: unknown field (did you mean 'rounds'?)", "federation.roundz=3"),
    case("unknown-attack", "attacks[0].name: unknown attack", "attacks=[{name: nope}]"),
    case("unknown-attack-long-name", "attacks[0].name: unknown attack", "attacks=[{name: " + "n" * 50000 + "}]"),
    case("attack-name-not-string", "attacks[0].name: ", "attacks=[{name: [1, 2]}]"),
    case("attack-without-name", "attacks[0].name: is required", "attacks=[{}]"),
    case("unknown-plugin-option", "defenses[0].max_nrom: unknown option", "defenses=[{name: norm_clip, max_nrom: 1}]"),
    case("plugin-option-out-of-range", "defenses[0].max_norm: ", "defenses=[{name: norm_clip, max_norm: -1}]"),
    case("defense-given-as-attack", "attacks[0].name: unknown attack", "attacks=[{name: norm_clip}]"),
    case("unknown-aggregator", "federation.aggregator.name: unknown aggregator", "federation.aggregator=nope"),
    case("quantization-on-cpu-build", "model.quantization ", "model.quantization=4bit"),
    case("natural-without-by", "data.partition.by ", "data.partition.method=natural"),
    case("chat-on-synthetic", "data.format chat", "data.format=chat"),
    case("matrix-on-run", "", "matrix={seed: [0, 1]}", command="run"),
]

FILES = [
    case("file-alias-bomb-in-enum", "model.dtype: expands", text=top("").replace(
        "  arch: gpt2", "  arch: gpt2\n  dtype: " + BOMB)),
    case("file-merge-key-bomb", "defenses: expands", text=top("defenses: " + MERGE_BOMB + "\n")),
    case("file-recursive-merge", "federation.aggregator.<<: an alias refers", text=top("").replace(
        "federation:\n", "federation:\n  aggregator: &x {<<: *x}\n")),
    case("file-deep-nesting", "attacks[0][0][0][0][0][0]…: nested more than 32 levels",
         text=top("attacks: " + "[" * 5000 + "]" * 5000 + "\n")),
    case("file-too-large", "{scenario}: ", text=top("# " + "x" * 1_100_000 + "\n")),
    case("file-huge-int", "{scenario}: not valid YAML: an integer", text=top("").replace("seed: 0", "seed: " + "7" * 10000)),
    case("file-duplicate-key", "{scenario}: not valid YAML", text=top("seed: 1\n")),
    case("file-python-tag", "{scenario}: not valid YAML", text="name: !!python/object/apply:os.system ['echo pwned']\n"),
    case("file-set-tag", "{scenario}: not valid YAML", text=top("").replace("seed: 0", "seed: !!set {1, 2}")),
    case("file-timestamp-name", "name: ", text=top("").replace("name: tiny", "name: 2024-01-01 10:00:00")),
    case("file-bad-indent", "{scenario}: not valid YAML", text="name: tiny\n model: [\n"),
    case("file-tab-indent", "{scenario}: not valid YAML", text="name: tiny\nmodel:\n\tarch: gpt2\n"),
    case("file-list-root", "{scenario}: a scenario is a mapping", text="- 1\n- 2\n"),
    case("file-scalar-root", "{scenario}: a scenario is a mapping", text="just a string\n"),
    case("file-empty", "{scenario}: a scenario is a mapping", text=""),
    case("file-two-documents", "{scenario}: not valid YAML", text=top("---\nname: other\n")),
    case("file-not-utf8", "{scenario}: not UTF-8", text=b"name: \xff\xfe tiny\n"),
    case("file-int-keys", "1: a field name must be text", text=top("1: one\n")),
    case("file-null-key", "None: a field name must be text", text=top("null: x\n")),
    case("file-yes-key", "model.True: a field name must be text", text=top("").replace("  arch: gpt2", "  arch: gpt2\n  on: 1")),
    case("file-long-unknown-key", "k" * 39 + "…: unknown field", text=top("k" * 1000 + ": 1\n")),
    case("file-too-long-key", "{scenario}: not valid YAML", text=top("k" * 200000 + ": 1\n")),
    case("file-long-enum-value", "model.dtype: got '" + "f" * 20, text=top("").replace(
        "  arch: gpt2", "  arch: gpt2\n  dtype: " + "f" * 200000)),
    case("file-many-list-errors", "tuning.lora.target_modules[", text=top("").replace(
        "  lora:", "  lora:\n    target_modules: [" + ", ".join(["[1]"] * 20000) + "]")),
    case("file-missing", "{tmp}/nope.yaml: no such scenario file", text=None, edit="missing"),
    case("file-is-directory", "{tmp}: not a file", text=None, edit="directory"),
]

DATA = [
    case("data-bad-jsonl", "data.path: {files}/bad.jsonl could not be read as jsonl", edit=with_files("bad.jsonl")),
    case("data-bad-json", "data.path: {files}/bad.json could not be read", edit=with_files("bad.json")),
    case("data-bad-csv", "data.path: {files}/bad.csv could not be read as csv", edit=with_files("bad.csv")),
    case("data-bad-parquet", "data.path: {files}/bad.parquet could not be read as parquet", edit=with_files("bad.parquet")),
    case("data-txt-not-utf8", "data.path: {files}/bad.txt could not be read as txt", edit=with_files("bad.txt")),
    case("data-json-scalar", "data.path: {files}/scalar.json", edit=with_files("scalar.json")),
    case("data-json-list-of-numbers", "data.text_field: no column 'text'", edit=with_files("list.json")),
    case("data-empty-file", "data.text_field: no column 'text'", edit=with_files("empty.jsonl")),
    case("data-missing-file", "data.path: {files}/nope.jsonl does not exist", edit=with_files("nope.jsonl")),
    case("data-directory", "data.path: {files}/dir.jsonl is not a file", edit=with_files("dir.jsonl")),
    case("data-unsupported-extension", "data.path: {files}/data.xlsx has an unsupported extension",
         edit=with_files("data.xlsx")),
    case("data-nul-in-path", "data.path: ", edit=with_files("a\x00b.jsonl")),
    case("data-missing-text-column", "data.text_field: no column 'body'", edit=with_files("good.jsonl", text_field="body")),
    case("data-too-few-records", "data.heldout_examples: ", edit=with_files("good.jsonl", heldout_examples=500)),
    case("data-too-few-distinct", "data.heldout_examples: the held-out and public splits took all 600 records, "
         "which are 1 distinct", edit=with_files("same.jsonl")),
    case("data-chat-not-a-list", "data.messages_field: row 0", edit=with_files("chat_bad.jsonl", format="chat")),
    case("data-chat-bad-role", "data.messages_field: row 0: role", edit=with_files("chat_role.jsonl", format="chat")),
    case("data-chat-last-not-assistant", "data.messages_field: row 0: the last message",
         edit=with_files("chat_last.jsonl", format="chat")),
    case("data-natural-missing-column", "data.partition.by: no column 'user'",
         edit=with_files("good.jsonl", partition={"method": "natural", "by": "user"})),
    case("data-dirichlet-missing-label", "data.label_field: no column 'topic'",
         edit=with_files("good.jsonl", partition={"method": "dirichlet"})),
    case("data-datasets-bad-file", "data.data_files: ", edit=lambda raw: (files_source(raw), raw["data"].update(
        source="datasets", path="json", data_files="{files}/bad.jsonl"))),
    case("data-datasets-missing-file", "data.data_files: ", edit=lambda raw: (files_source(raw), raw["data"].update(
        source="datasets", path="json", data_files="{files}/nope.jsonl"))),
    case("data-datasets-bad-split", "data.data_files: ", edit=lambda raw: (files_source(raw), raw["data"].update(
        source="datasets", path="json", data_files="{files}/good.jsonl", split="test"))),
    case("data-datasets-hub-offline", "data.path: 'nobody-here/no-such-dataset'",
         edit=lambda raw: (files_source(raw), raw["data"].update(source="datasets", path="nobody-here/no-such-dataset"))),
    case("data-topics-1-too-many-heldout", "data.heldout_examples: the synthetic corpus gave only", "data.topics=1",
         "data.heldout_examples=120000"),
    case("data-canary-client-out-of-range", "data.canaries.clients: [7] are not client ids", "data.canaries.clients=[7]"),
    case("data-min-examples-too-many", "data.partition.min_examples: ", "data.partition.min_examples=100"),
]

MODELS = [
    case("model-missing-local-path", "model.name_or_path: '/nonexistent/model' does not exist", "model.arch=null",
         "model.name_or_path=/nonexistent/model", "model.tokenizer.kind=model"),
    case("model-hub-name-offline", "model.name_or_path: 'nobody-here/no-such-model' is neither", "model.arch=null",
         "model.name_or_path=nobody-here/no-such-model", "model.tokenizer.kind=model"),
    case("model-invalid-hub-name", "model.name_or_path: ", "model.arch=null", "model.name_or_path=a..b",
         "model.tokenizer.kind=model"),
    case("model-folder-without-tokenizer", "model.name_or_path: the tokenizer of '{short}-weights'", "model.arch=null",
         "model.name_or_path={short}-weights", "model.tokenizer.kind=model"),
    case("model-file-not-folder", "model.name_or_path: ", "model.arch=null", "model.name_or_path={files}/good.jsonl",
         "model.tokenizer.kind=model"),
    case("checkpoint-positions-below-seq-len", "data.seq_len: 32 exceeds the 24 positions",
         "model.name_or_path={short}", edit=loaded),
    case("checkpoint-positions-below-prompt", "data.seq_len: 16 + tuning.prompt.num_virtual_tokens (16) exceeds",
         "model.name_or_path={short}", "data.seq_len=16", "tuning.mode=prompt", "tuning.prompt.num_virtual_tokens=16",
         edit=loaded),
    case("checkpoint-target-modules", "tuning.lora.target_modules: PEFT refused", "model.name_or_path={ckpt}",
         "tuning.lora.target_modules=[q_proj]", edit=loaded),
    case("checkpoint-quantized-on-cpu", "model.quantization: ", "model.name_or_path={ckpt}", "model.quantization=8bit",
         edit=loaded),
]

TRACKING = [
    case("output-dir-under-a-file", "tracking.output_dir: ", "tracking.output_dir={files}/good.jsonl/runs"),
    case("store-folder-under-a-file", "tracking.uri: ", "tracking.enabled=true",
         "tracking.uri=sqlite:///{files}/good.jsonl/mlflow.db"),
    case("store-not-a-database", "tracking.uri: ", "tracking.enabled=true", "tracking.uri=sqlite:///{files}/bad.csv"),
]

SWEEPS = [
    case("sweep-bomb-in-matrix", "matrix.seed: expands", "matrix={seed: " + BOMB + "}", command="sweep"),
    case("sweep-too-many-combinations", "matrix: ", "matrix={seed: [" + ", ".join(map(str, range(40))) + "], "
         "federation.rounds: [" + ", ".join(map(str, range(1, 41))) + "]}", command="sweep"),
    case("sweep-bad-path", "matrix combination [name.x=1]: matrix.name.x: name is", "matrix={name.x: [1]}",
         command="sweep"),
    case("sweep-empty-alternatives", "matrix.seed: give at least one", "matrix={seed: []}", command="sweep"),
    case("sweep-not-a-list", "matrix.seed: ", "matrix={seed: 3}", command="sweep"),
    case("sweep-bad-alternative", "matrix combination [federation.rounds=0]: federation.rounds: must be ≥ 1",
         "matrix={federation.rounds: [2, 0]}", command="sweep"),
]

RUNS = [  # the same refusals through `fedsec run`: exit 2 and no run recorded
    case("run-set-subfield-of-str", "--set name.x", "name.x=1", command="run"),
    case("run-alias-bomb", "model.dtype: expands", "model.dtype=" + BOMB, command="run"),
    case("run-target-modules", "tuning.lora.target_modules: PEFT refused", "tuning.lora.target_modules=[nope]",
         command="run"),
    case("run-missing-checkpoint", "model.name_or_path: ", "model.arch=null", "model.name_or_path=/nonexistent/model",
         "model.tokenizer.kind=model", command="run"),
    case("run-checkpoint-positions", "data.seq_len: 32 exceeds the 24 positions", "model.name_or_path={short}",
         edit=loaded, command="run"),
    case("run-vocab-1e9", "model.tokenizer.vocab_size: must be ≤", "model.tokenizer.vocab_size=1000000000",
         command="run"),
    case("run-bad-data-file", "data.path: ", edit=with_files("bad.csv"), command="run"),
]

CASES = SETS + BOUNDS + SCHEMA + FILES + DATA + MODELS + TRACKING + SWEEPS + RUNS


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return make_folders(tmp_path_factory.mktemp("hostile"))


def make_folders(root: Path) -> dict[str, str]:
    """{files}: bad data files; {ckpt}: a tiny GPT-2 saved with its tokenizer; {short}: one with 24 positions
    ({short}-weights: its weights alone, no tokenizer)."""
    from fedsec_bench import load_scenario
    from fedsec_bench.models import make_model, make_tokenizer

    files = root / "files"
    files.mkdir()
    (files / "good.jsonl").write_text("".join(json.dumps({"text": f"record number {i} of the file"}) + "\n"
                                              for i in range(600)))
    (files / "same.jsonl").write_text((json.dumps({"text": "the same record"}) + "\n") * 600)
    (files / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (files / "bad.json").write_text("not json at all")
    (files / "bad.csv").write_text('a,b\n1,2,3,4\n"x')
    (files / "bad.parquet").write_bytes(b"PAR1 this is no parquet")
    (files / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    (files / "scalar.json").write_text("5")
    (files / "list.json").write_text("[1, 2, 3]")
    (files / "empty.jsonl").write_text("")
    (files / "dir.jsonl").mkdir()
    chat = {"chat_bad": {"messages": "hello"}, "chat_role": {"messages": [{"role": "robot", "content": "x"}]},
            "chat_last": {"messages": [{"role": "user", "content": "x"}]}}
    for name, row in chat.items():
        (files / f"{name}.jsonl").write_text((json.dumps(row) + "\n") * 40)
    folders = {"files": str(files), "tmp": str(root)}
    for name, positions in (("ckpt", 64), ("short", 24)):
        scenario = load_scenario(TINY, [f"model.max_positions={positions}", "data.seq_len=16"])
        tokenizer = make_tokenizer(scenario.model, [f"some public text {i}" for i in range(50)])
        model = make_model(scenario.model, tokenizer, 0)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        model.save_pretrained(root / f"{name}-weights")
        folders[name] = str(root / name)
    return folders


def fill(value, folders: dict[str, str]):
    """The case with the fixtures' folders in place of their {names}."""
    if isinstance(value, str):
        for name, path in folders.items():
            value = value.replace("{" + name + "}", path)
        return value
    if isinstance(value, list):
        return [fill(v, folders) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, folders) for k, v in value.items()}
    return value


def scenario_file(tmp_path: Path, folders: dict[str, str], text, edit) -> Path:
    if edit == "missing":
        return Path(folders["tmp"]) / "nope.yaml"
    if edit == "directory":
        return Path(folders["tmp"])
    raw = copy.deepcopy(TINY)
    raw["tracking"] = {"enabled": False, "output_dir": str(tmp_path / "runs"), "uri": f"sqlite:///{tmp_path}/mlflow.db"}
    if callable(edit):
        edit(raw)
    path = tmp_path / "scenario.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(yaml.safe_dump(fill(raw, folders), sort_keys=False) if text is None else text)
    return path


def refusal(expect, sets, text, edit, command, folders: dict[str, str], tmp_path: Path) -> str | None:
    """Run one case in-process; None when it is refused cleanly, else what went wrong."""
    path = scenario_file(tmp_path, folders, text, edit)
    args = [command, str(path)] + [a for s in fill(sets, folders) for a in ("--set", s)]
    args += ["--dry-run"] if command == "sweep" else ["--quiet"] if command == "run" else []
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    took = time.perf_counter() - started
    out, err = out.getvalue(), err.getvalue()
    expect = fill(expect, {**folders, "scenario": str(path)})
    lines = [line.strip() for line in err.splitlines() if line.strip().startswith("error: ")]  # libraries' progress bars aside; run and validate indent them under their stage
    runs = tmp_path / "runs"
    problems = [
        code != 2 and f"exit {code}",
        "Traceback" in out + err and "a traceback",
        not any(line.startswith("error: " + expect) for line in lines) and f"no line 'error: {expect[:60]}'",
        (len(err) > 10_000 or max(map(len, lines), default=0) > 2_000) and f"{len(err)} characters of errors",
        took > 20 and f"{took:.0f} s",
        runs.exists() and any(runs.iterdir()) and "a run folder left behind",
    ]
    problems = [p for p in problems if p]
    return "; ".join(problems) + f"\n{err[-3000:]}" if problems else None


@pytest.mark.parametrize("expect, sets, text, edit, command", CASES)
def test_bad_input_is_refused_cleanly(expect, sets, text, edit, command, folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problem = refusal(expect, sets, text, edit, command, folders, tmp_path)
    assert problem is None, problem


def test_the_corpus_is_large_and_ids_are_unique():
    ids = [param.id for param in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 100


def test_a_tracked_run_refused_leaves_no_run_in_the_store(folders, tmp_path, capsys, monkeypatch):
    """With tracking on, a refusal found after the plan (a missing target module) records nothing in MLflow."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    path = scenario_file(tmp_path, folders, None, None)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(["run", str(path), "--quiet", "--set", "tracking.enabled=true", "--set", f"tracking.uri={uri}",
                 "--set", "tracking.experiment=hostile", "--set", "tuning.lora.target_modules=[nope]"])
    assert code == 2 and "error: tuning.lora.target_modules: " in capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("hostile")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
