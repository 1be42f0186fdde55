"""Every robust rule against every poisoning attack: the robustness verdict as a results table.

Runs ``scenarios/robustness_matrix.yaml`` as ``fedsec sweep`` does (each child tracked in a throwaway
MLflow store, then compared from it) and writes ``results/robustness_matrix.md``: per rule its worst
case over the attacks (:func:`fedsec_bench.robustness.worst_case`), then the final eval loss and
backdoor ASR of every (rule, attack) cell.

    python benchmarks/robustness_matrix_table.py [--jobs 2]     # about 40 min on 2 CPU cores

The first line of the table's file records the command that wrote it.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import fedsec_bench
from fedsec_bench.robustness import BACKDOOR, UTILITY, cells, to_markdown, worst_case
from fedsec_bench.sweep import run_sweep

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "scenarios" / "robustness_matrix.yaml"
OUT = ROOT / "results" / "robustness_matrix.md"


def grid(table, figure: str) -> str:
    """Rules as rows, attacks as columns, the figure's mean over seeds in each cell."""
    pivot = table.pivot_table(index="defense", columns="attack", values=figure, aggfunc="mean", sort=False)
    return pivot.to_markdown(floatfmt=".2f", missingval="") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="children at once (default: %(default)s)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        overrides = [f"tracking.uri=sqlite:///{scratch}/mlflow.db", f"tracking.output_dir={scratch}/runs"]
        _, outcomes, runs = run_sweep(SWEEP, overrides, args.jobs,
                                      on_child=lambda o: print(f"{o.status:<8} {o.label}", flush=True))
    failed = [o.label for o in outcomes if o.status != "FINISHED"]
    table = cells(runs)
    minutes = (time.perf_counter() - started) / 60
    command = "python benchmarks/robustness_matrix_table.py"
    lines = [
        f"Written by `{command}` (fedsec-bench {fedsec_bench.__version__}, torch {torch.__version__}, "
        f"{platform.machine()} CPU, {args.jobs} jobs, {minutes:.0f} min) from `scenarios/robustness_matrix.yaml`: "
        f"{len(outcomes)} runs, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}.",
        "",
        "Tiny GPT-2 (1 layer, width 32) trained from scratch, full tuning, 10 clients all in every round, 4 rounds, "
        "seed 0. Untargeted attacks: 3 of the 10 clients in every round; backdoor and neurotoxin: client 0, dba: "
        "clients 0 and 1, in rounds 3-4, boosted by scaling (model replacement). `f`: what the rule was declared to "
        "tolerate; `malicious`: how many clients really attacked. Every figure is worse when higher.",
        "",
        "## Worst case per rule (over the attacks; the clean run apart)",
        "",
        to_markdown(worst_case(table)),
        f"## Final {UTILITY} per cell (lower is better)",
        "",
        grid(table, UTILITY),
        f"## Final {BACKDOOR} per cell (lower is better)",
        "",
        grid(table.dropna(subset=[BACKDOOR]), BACKDOOR),
    ]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
