"""Round time and driver memory with ``executor: ray`` against ``local``.

Three measurements, each configuration in a fresh process (so that resident memory is its own):

1. ray ÷ local round time, 8 clients per round, on a Ray instance of ``--cpus`` CPUs (one
   client worker per CPU). Ray start-up and round 1 (which waits for the workers to build
   their runtime) are excluded: the figure is the mean of rounds 2.. .
2. ray round time against clients per round (2, 4, 8, 16): expected linear, slope ≈
   one client's training time ÷ the number of workers.
3. ray round time and the driver's resident memory against registered clients (100, 1,000,
   10,000) at 10 clients per round: expected flat (the driver holds no per-client model,
   data or worker state between rounds; the data partition is index arrays).

    python benchmarks/ray_scaling.py                # writes results/ray_scaling.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SCENARIO = {
    "name": "ray-scaling",
    "seed": 0,
    "model": {"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "tokenizer": {"kind": "bpe", "vocab_size": 512}},
    "tuning": {"mode": "lora", "lora": {"r": 8, "alpha": 16}},
    "data": {"examples_per_client": 32, "seq_len": 48, "heldout_examples": 32},
    "federation": {"num_clients": 64, "clients_per_round": 8, "rounds": 4, "local_steps": 8, "batch_size": 8,
                   "lr": 0.002, "eval_every": 1000},
    "tracking": {"enabled": False},
    "device": "cpu",
}


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(executor: str, num_clients: int, per_round: int, rounds: int, cpus: int, workdir: str) -> dict:
    """One configuration, in this process: mean round seconds over rounds 2.., driver RSS per round."""
    import torch

    import fedsec_bench

    torch.set_num_threads(cpus)  # local trains one client at a time on every CPU; ray gives each worker one
    scenario = json.loads(json.dumps(SCENARIO))
    scenario["federation"] |= {"executor": executor, "num_clients": num_clients, "clients_per_round": per_round,
                               "rounds": rounds, "ray": {"max_concurrency": cpus}}
    scenario["tracking"]["output_dir"] = workdir
    if executor == "ray":
        import ray

        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    memory: list[float] = []
    result = fedsec_bench.run(scenario, on_round=lambda rnd, _: memory.append(resident_mib()))
    seconds = result.metrics["cost.round_seconds"].iloc[2:].tolist()  # rows: round 0 (eval), 1 (warm-up), 2..
    return {"executor": executor, "num_clients": num_clients, "per_round": per_round,
            "round_s": statistics.mean(seconds), "rss_mib_round1": memory[0], "rss_mib_last": memory[-1]}


def in_subprocess(**config) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(config | {"workdir": workdir})],
            check=True, capture_output=True, text=True,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="results/ray_scaling.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return

    common = {"rounds": args.rounds, "cpus": args.cpus}
    lines = [f"# executor: ray against local ({args.cpus} CPUs)", "",
             f"Made by `python benchmarks/ray_scaling.py --cpus {args.cpus} --rounds {args.rounds}`: mean round "
             "seconds over rounds 2.. (Ray start-up and the workers' first round excluded), tiny GPT-2 + LoRA, "
             f"{SCENARIO['federation']['local_steps']} local steps per client.", ""]

    local = in_subprocess(executor="local", num_clients=64, per_round=8, **common)
    distributed = in_subprocess(executor="ray", num_clients=64, per_round=8, **common)
    ratio = distributed["round_s"] / local["round_s"]
    lines += ["## 8 clients per round", "", "| executor | round s |", "| --- | --- |",
              f"| local | {local['round_s']:.3f} |", f"| ray | {distributed['round_s']:.3f} |", "",
              f"ray ÷ local = **{ratio:.2f}**", ""]
    print(f"8 clients per round: local {local['round_s']:.3f}s, ray {distributed['round_s']:.3f}s, ratio {ratio:.2f}")

    lines += ["## Clients per round (ray)", "", "| clients per round | round s | s per client |", "| --- | --- | --- |"]
    for per_round in (2, 4, 8, 16):
        row = distributed if per_round == 8 else in_subprocess(executor="ray", num_clients=64, per_round=per_round, **common)
        lines.append(f"| {per_round} | {row['round_s']:.3f} | {row['round_s'] / per_round:.3f} |")
        print(f"ray, {per_round} per round: {row['round_s']:.3f}s")

    lines += ["", "## Registered clients (ray, 10 per round)", "",
              "| registered clients | round s | driver RSS after round 1 (MiB) | after the last round (MiB) |",
              "| --- | --- | --- | --- |"]
    for registered in (100, 1000, 10000):
        row = in_subprocess(executor="ray", num_clients=registered, per_round=10, **common)
        lines.append(f"| {registered} | {row['round_s']:.3f} | {row['rss_mib_round1']:.0f} | {row['rss_mib_last']:.0f} |")
        print(f"ray, {registered} registered: {row['round_s']:.3f}s, RSS {row['rss_mib_round1']:.0f} -> "
              f"{row['rss_mib_last']:.0f} MiB")
    lines += ["", "The driver builds the federation's data itself (the synthetic corpus, "
              f"{SCENARIO['data']['examples_per_client']} sentences per registered client, and the partition's index "
              "arrays), so its memory grows with registered clients by that corpus only; compare the rows. Between "
              "rounds it keeps no per-client model, optimizer or worker state: compare the two RSS columns."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
