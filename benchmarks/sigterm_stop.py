"""How long SIGTERM takes to end a run cleanly (recorded KILLED, metrics and artifacts written).

Runs ``fedsec run`` in a subprocess on a scenario (the bundled quickstart by default, with
more rounds so it is mid-training), waits until its first checkpoint exists, sends SIGTERM at
a random point of a later round, and times the signal to the process's exit. The reference,
measured in the same run, is the scenario's median round time (``cost.round_seconds`` from
the run's metrics.csv): a clean stop should take a small fraction of one round, since it waits
only for the Python step under way (one batch, or one evaluation) and then writes the record.

    python benchmarks/sigterm_stop.py                          # quickstart, 5 stops
    python benchmarks/sigterm_stop.py --scenario instruction_tuning --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def one_stop(scenario: str, folder: Path, rng: random.Random) -> tuple[float, float, str]:
    """(seconds from SIGTERM to exit, median round seconds, the recorded status)."""
    runs = folder / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsec_bench", "run", scenario, "--quiet",
         "--set", "federation.rounds=1000", "--set", f"tracking.output_dir={runs}",
         "--set", f"tracking.uri=sqlite:///{folder}/mlflow.db"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    while not list(runs.glob("*/*/checkpoints/round-*.pt")):
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        time.sleep(0.05)
    time.sleep(rng.uniform(0.5, 3.0))  # somewhere inside a later round
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    took = time.perf_counter() - sent
    [run_dir] = runs.glob("*/*")
    rounds = pd.read_csv(run_dir / "artifacts" / "metrics.csv")["cost.round_seconds"].dropna()
    status = json.loads((run_dir / "summary.json").read_text())["status"]
    assert proc.returncode == 143, proc.stderr.read()
    return took, float(rounds.median()), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="quickstart")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    stops, rounds = [], []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            took, round_s, status = one_stop(args.scenario, Path(scratch), rng)
        stops.append(took)
        rounds.append(round_s)
        print(f"stop {i + 1}: {took:.2f} s to exit ({status}); a round takes {round_s:.2f} s")
    stop, round_s = statistics.median(stops), statistics.median(rounds)
    print(f"\n{args.scenario}: SIGTERM to clean exit {stop:.2f} s (median of {args.repeats}, max {max(stops):.2f} s); "
          f"round {round_s:.2f} s; stop / round = {stop / round_s:.2f}")


if __name__ == "__main__":
    main()
