"""One federated instruction-tuning round at GPT-2-small size on CPU: where its time goes, its memory, its cost.

Three workloads, each a real ``fedsec_bench.run`` in a fresh process: ``lora`` (LoRA r = 8 on
c_attn, c_proj and c_fc, as scenarios/instruction_tuning.yaml), ``full`` (every weight) and
``dp_sgd`` (the lora round with DP-SGD, σ = 1, C = 1). A round is 2 clients × 4 local
steps of batch 4 on instruction records longer than ``--seq-len`` (every sequence is full
and keeps the end of its prompt, masked out of the loss), evaluated with the scenario
defaults of ``eval.*`` and logged to MLflow (SQLite). The model is GPT-2's shape
(``--layers`` 12, ``--hidden`` 768, hidden / 64 heads) with GPT-2's 50257-row vocabulary
(``model.vocab``): the BPE trained on the public split stops far below that, as the
synthetic words allow no more merges; the output says how far.

The round is timed through the harness's own methods, wrapped for the run only:
local training = ``LocalExecutor.run_clients``, evaluation = ``Federation.evaluate``
(held-out loss + greedy answers), aggregation = ``HookChain.aggregation``, logging =
``Tracker.log_metrics``; other = the rest (sampling, snapshot, server step, round figures,
``score_round`` hooks such as DP accounting). Peak RSS is the process's resident high-water
mark during the round (Linux: reset at each round's start through /proc/self/clear_refs).

After each round the plain loop trains the same model (its state put back afterwards) on
the same batches (that round's clients' loaders): AdamW, one step per batch, 8 steps.
Round 1 and the first plain loop are warm-ups; figures are medians of the ``--repeats``
rounds and plain loops after them, which alternate (peak RSS: the largest).

    python benchmarks/instruction_round.py                         # GPT-2 small, seq 256 (tens of minutes)
    python benchmarks/instruction_round.py --layers 2 --hidden 128 --seq-len 64 --repeats 1   # a check

Reading the ratios:

- harness ÷ plain = (round − evaluation) ÷ plain loop: what the harness adds to the same
  training (per-client loaders and optimizers, state copies, hooks, FedAvg, logging).
  Target ≤ 1.10. local ÷ plain is the client side alone.
- evaluation share = evaluation ÷ round. Target about 10%.
- dp_sgd ÷ lora: the private round's time over the non-private one's (and local training's).
  The two run one after the other; the same ratio taken over each run's own plain loop
  (the same loop in both) cancels a change of load on the machine between them.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import random
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from unittest.mock import patch

import pandas as pd
import torch

import fedsec_bench
import fedsec_bench.federation
from fedsec_bench.client import epochs
from fedsec_bench.data.synthetic import TOPIC_NAMES, sentence
from fedsec_bench.executors import LocalExecutor
from fedsec_bench.federation import Federation
from fedsec_bench.plugins import HookChain
from fedsec_bench.tracking import Tracker

MODES = ("lora", "full", "dp_sgd")
VOCAB = 50257  # GPT-2's
CLIENTS, LOCAL_STEPS, BATCH = 2, 4, 4
HELDOUT, PUBLIC = 64, 256  # the data.* defaults
PARTS = ("local training", "evaluation", "aggregation", "logging")
EVAL_PARTS = ("evaluation: loss", "evaluation: generation")
"""Inside evaluation: ``evaluate`` and ``answer_quality`` as Federation.evaluate calls them."""


def write_records(path: Path, seq_len: int) -> None:
    """Instruction records of about 1.3 × seq_len tokens: a note of ~seq_len / 2 tokens to report on, in
    the prompt, and a response of ~3/4 seq_len, so every sequence is cut to seq_len keeping some prompt."""
    rng = random.Random(0)
    count = HELDOUT + PUBLIC + CLIENTS * LOCAL_STEPS * BATCH  # one epoch of local steps per client

    def text(topic: str, tokens: int) -> str:  # a synthetic sentence is about 10 tokens
        return " ".join(sentence(rng, topic) for _ in range(max(1, tokens // 10)))

    with path.open("w") as out:
        for i in range(count):
            topic = TOPIC_NAMES[i % len(TOPIC_NAMES)]
            record = {"instruction": f"write a long report about {topic} from these notes .",
                      "input": text(topic, seq_len // 2), "output": text(topic, seq_len * 3 // 4)}
            out.write(json.dumps(record) + "\n")


def scenario(mode: str, args: argparse.Namespace, data: Path, workdir: Path) -> dict:
    return {
        "name": f"instruction_round_{mode}",
        "model": {"arch": "gpt2", "layers": args.layers, "hidden": args.hidden, "heads": max(1, args.hidden // 64),
                  "max_positions": max(256, args.seq_len), "vocab": VOCAB,
                  "tokenizer": {"kind": "bpe", "vocab_size": VOCAB}},
        "tuning": {"mode": "full" if mode == "full" else "lora",
                   "lora": {"r": 8, "alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"]}},
        "data": {"source": "files", "path": str(data), "format": "instruction", "seq_len": args.seq_len,
                 "heldout_examples": HELDOUT, "public_examples": PUBLIC},
        "federation": {"num_clients": CLIENTS, "clients_per_round": CLIENTS, "rounds": args.repeats + 1,
                       "local_steps": LOCAL_STEPS, "batch_size": BATCH},
        "defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}] if mode == "dp_sgd" else [],
        "tracking": {"uri": f"sqlite:///{workdir}/mlflow.db", "output_dir": str(workdir / "runs")},
        "device": "cpu",
    }


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


class RoundClock:
    """Seconds per part of each round, from the harness's own methods wrapped while ``instrument`` is open."""

    def __init__(self):
        self.round = 0
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.federation: Federation | None = None

    def timed(self, part: str, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[self.round][part] += time.perf_counter() - started
        return wrapper

    def starts_round(self, run_round):
        @functools.wraps(run_round)
        def wrapper(federation, rnd):
            self.federation, self.round = federation, rnd
            reset_peak_rss()
            self.started = time.perf_counter()
            return run_round(federation, rnd)
        return wrapper

    def instrument(self) -> ExitStack:
        stack = ExitStack()
        for owner, name, part in [
            (LocalExecutor, "run_clients", PARTS[0]), (Federation, "evaluate", PARTS[1]),
            (HookChain, "aggregation", PARTS[2]), (Tracker, "log_metrics", PARTS[3]),
            (fedsec_bench.federation, "evaluate", EVAL_PARTS[0]),
            (fedsec_bench.federation, "answer_quality", EVAL_PARTS[1]),
        ]:
            stack.enter_context(patch.object(owner, name, self.timed(part, getattr(owner, name))))
        stack.enter_context(patch.object(Federation, "run_round", self.starts_round(Federation.run_round)))
        return stack

    def finish(self, rnd: int) -> dict[str, float]:
        """The round just logged: its total, its parts, the rest, and its peak RSS."""
        total = time.perf_counter() - self.started
        parts = dict(self.seconds[rnd])
        return {"round": total, **parts, "other": total - sum(parts.get(p, 0.0) for p in PARTS),
                "peak_rss_mib": peak_rss_mib()}


def plain_loop(model: torch.nn.Module, params: list[torch.nn.Parameter], batches: list[dict], fed) -> float:
    """Seconds for a plain PyTorch + PEFT loop over ``batches``: AdamW as the clients', one step per batch."""
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(params, lr=fed.lr, weight_decay=fed.weight_decay)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def plain_after(federation: Federation, rnd: int) -> float:
    """The plain loop on the batches round ``rnd``'s clients trained on, the model's state restored after."""
    rt, fed = federation.rt, federation.config
    batches = [
        batch
        for cid in federation.sample_clients(rnd)
        for batch in islice(epochs(rt.batcher.loader(rt.data.client_examples(cid), seed=rt.seed_for(rnd, cid))),
                            fed.local_steps)
    ]
    state = rt.trainable.snapshot()
    seconds = plain_loop(rt.model, list(rt.trainable.params.values()), batches, fed)
    rt.trainable.load(state)
    return seconds


def measure(mode: str, args: argparse.Namespace, data: Path, workdir: Path) -> dict:
    """One mode's run: medians of the timed rounds and plain loops, and what the output's header needs."""
    clock, rounds, plain = RoundClock(), [], []

    def on_round(rnd: int, metrics: dict[str, float]) -> None:
        rounds.append(clock.finish(rnd) | {"bytes_up": metrics["cost.bytes_up"]})
        plain.append(plain_after(clock.federation, rnd))

    with clock.instrument():
        fedsec_bench.run(scenario(mode, args, data, workdir / mode), on_round=on_round)
    timed = rounds[1:]
    figures = {key: statistics.median(r.get(key, 0.0) for r in timed) for key in timed[0]}
    rt = clock.federation.rt
    encoded = rt.batcher.encode(rt.data.members())
    return figures | {
        "peak_rss_mib": max(r["peak_rss_mib"] for r in timed),
        "plain": statistics.median(plain[1:]),
        "trainable": rt.trainable.num_values(),
        "tokenizer_size": len(rt.tokenizer),
        "model_vocab": rt.model.get_input_embeddings().num_embeddings,
        "sequence_tokens": statistics.mean(len(e.ids) for e in encoded),
        "prompt_tokens": statistics.mean(e.prompt_tokens for e in encoded),
        "eval": dict(zip(("max_examples", "generation_examples"), rt.scenario.eval_examples()),
                     batch_size=rt.scenario.eval.batch_size, max_new_tokens=rt.scenario.eval.max_new_tokens),
        "threads": torch.get_num_threads(),
    }


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new interpreter, so each mode's peak RSS and allocator state are its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def table(results: dict[str, dict]) -> pd.DataFrame:
    rows = {}
    for mode, r in results.items():
        rows[mode] = {
            "round (s)": f"{r['round']:.3f}",
            **{f"{p} (s)": f"{r.get(p, 0.0):.3f}" for p in (PARTS[0], PARTS[1], *EVAL_PARTS, *PARTS[2:])},
            "other (s)": f"{r['other']:.3f}",
            "plain loop (s)": f"{r['plain']:.3f}",
            "harness ÷ plain": f"{(r['round'] - r['evaluation']) / r['plain']:.3f}",
            "local ÷ plain": f"{r['local training'] / r['plain']:.3f}",
            "evaluation share": f"{r['evaluation'] / r['round']:.1%}",
            "trainable values": f"{r['trainable']:,}",
            "bytes up per client (MB)": f"{r['bytes_up'] / 1e6:.2f}",
            "peak RSS (MiB)": f"{r['peak_rss_mib']:.0f}",
        }
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768, help="heads = hidden // 64, as GPT-2")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (and plain loops) after the warm-up")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "instructions.jsonl"
        write_records(data, args.seq_len)
        results = {mode: in_fresh_process(measure, mode, args, data, Path(tmp)) for mode in modes}
    first = next(iter(results.values()))
    ev = first["eval"]
    print(f"model: gpt2, {args.layers} layers, hidden {args.hidden}, {max(1, args.hidden // 64)} heads, vocabulary "
          f"{first['model_vocab']} (model.vocab); tokenizer: BPE trained on the public split, {first['tokenizer_size']} "
          f"tokens (asked {VOCAB}: the synthetic words allow no more merges)")
    print(f"round: {CLIENTS} clients x {LOCAL_STEPS} local steps, batch {BATCH}, seq_len {args.seq_len} (sequences: "
          f"{first['sequence_tokens']:.0f} tokens, {first['prompt_tokens']:.0f} of them prompt, masked); eval: "
          f"{ev['max_examples']} held-out examples in batches of {ev['batch_size']}, {ev['generation_examples']} answers "
          f"of {ev['max_new_tokens']} tokens; threads {first['threads']}; medians of {args.repeats} after a warm-up")
    print()
    print(table(results).to_markdown())
    print()
    for mode in ("lora", "full"):
        if mode in results:
            r = results[mode]
            print(f"{mode}: harness ÷ plain = {(r['round'] - r['evaluation']) / r['plain']:.3f} (target ≤ 1.10), "
                  f"evaluation share = {r['evaluation'] / r['round']:.1%} (target ~10%)")
    if "dp_sgd" in results and "lora" in results:
        dp, lora = results["dp_sgd"], results["lora"]
        drift = lora["plain"] / dp["plain"]  # the same plain loop in both runs: how much faster the machine was
        print(f"dp_sgd ÷ lora: round {dp['round'] / lora['round']:.2f}, "
              f"local training {dp['local training'] / lora['local training']:.2f}; "
              f"each over its own run's plain loop: round {dp['round'] / lora['round'] * drift:.2f}")


if __name__ == "__main__":
    main()
