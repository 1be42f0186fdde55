"""How much slower is a federated round through the harness than a plain PyTorch + PEFT loop?

Both sides train the same PEFT model on the same data for the same number of local
steps, in one process, and end with the same held-out evaluation. The harness side
adds what a real round costs: client sampling, loading and snapshotting the global
state, per-client optimizers and data loaders, the hook chain, FedAvg, and MLflow
logging of every metric. Round 1 (and a warm-up of the plain loop) is excluded from
both, so one-off costs (imports, MLflow's database creation, allocator warm-up)
do not count. Repeats interleave the two sides and report medians.

    python benchmarks/harness_overhead.py            # target: harness / plain <= 1.10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import torch

import fedsec_bench
from fedsec_bench.data import build_federated_data
from fedsec_bench.data.batching import Batcher
from fedsec_bench.evaluation import evaluate
from fedsec_bench.models import make_model, make_tokenizer
from fedsec_bench.tuning import apply_tuning

SCENARIO = {
    "name": "overhead",
    "seed": 0,
    "model": {"arch": "gpt2", "layers": 2, "hidden": 128, "heads": 4, "tokenizer": {"kind": "bpe", "vocab_size": 512}},
    "tuning": {"mode": "lora", "lora": {"r": 8, "alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"]}},
    "data": {"examples_per_client": 64, "seq_len": 64, "heldout_examples": 64},
    "federation": {"num_clients": 8, "clients_per_round": 4, "local_steps": 10, "batch_size": 16, "lr": 0.002,
                   "eval_every": 1000},
    "device": "cpu",
}


def time_harness(rounds: int, workdir: Path) -> float:
    """Seconds for rounds 2..rounds+1 of a real run (with MLflow logging to SQLite)."""
    marks: dict[int, float] = {}
    scenario = {**SCENARIO, "federation": {**SCENARIO["federation"], "rounds": rounds + 1},
                "tracking": {"uri": f"sqlite:///{workdir}/mlflow.db", "output_dir": str(workdir / "runs")}}
    fedsec_bench.run(scenario, on_round=lambda rnd, _: marks.__setitem__(rnd, time.perf_counter()))
    return marks[rounds + 1] - marks[1]


def time_plain(rounds: int) -> float:
    """Seconds for the same number of steps in a plain loop over the same model and data."""
    scenario = fedsec_bench.load_scenario(SCENARIO)
    fed = scenario.federation
    data = build_federated_data(scenario)
    tokenizer = make_tokenizer(scenario.model, data.public_texts())
    model = apply_tuning(make_model(scenario.model, tokenizer, scenario.seed), scenario.tuning)
    batcher = Batcher(tokenizer, scenario.data.seq_len, fed.batch_size)
    texts = [t for cid in range(data.num_clients) for t in data.client_examples(cid)]
    loader, eval_loader = batcher.loader(texts, seed=0), batcher.loader(data.heldout)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=fed.lr)
    steps = rounds * fed.clients_per_round * fed.local_steps

    def train(n: int) -> None:
        model.train()
        for batch in islice(cycle(loader), n):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    train(fed.clients_per_round * fed.local_steps)  # warm-up, like the harness's excluded round 1
    start = time.perf_counter()
    train(steps)
    evaluate(model, eval_loader, torch.device("cpu"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    harness, plain = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            harness.append(time_harness(args.rounds, Path(tmp)))
        plain.append(time_plain(args.rounds))
    fed = SCENARIO["federation"]
    steps = args.rounds * fed["clients_per_round"] * fed["local_steps"]
    h, p = statistics.median(harness), statistics.median(plain)
    print(f"local steps timed: {steps} ({args.rounds} rounds x {fed['clients_per_round']} clients x "
          f"{fed['local_steps']} steps), threads: {torch.get_num_threads()}, repeats: {args.repeats}")
    print(f"harness  median {h:.3f} s   runs: {', '.join(f'{x:.3f}' for x in harness)}")
    print(f"plain    median {p:.3f} s   runs: {', '.join(f'{x:.3f}' for x in plain)}")
    print(f"harness / plain = {h / p:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
