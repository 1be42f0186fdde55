"""Membership inference without and with DP: every method's AUC, TPR at 1 % FPR, ε audit and running time.

Runs ``scenarios/membership.yaml`` (a tiny model fine-tuned to overfit on the
mixed-difficulty corpus) three times through the public API, changing only the
defenses: none, DP-SGD (record-level, Opacus) and DP-FedAvg (user-level, with the
Poisson client sampling its accountant needs). Each run
scores every method on the same members and non-members (external threat, final
model). The running time of a method includes the training of the reference or
shadow models it needs, so the shadow-model attacks show what they cost.

    python benchmarks/membership_table.py     # writes results/membership/table.md and table.csv

The first line of table.md records the command that wrote it.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

import fedsec_bench

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "membership.yaml"
DELTA = 1e-5
"""δ of both DP defenses and of the attack's ε audit, so the audit and the accountant are comparable."""
VARIANTS = {
    "undefended": {},
    # ε ≈ 1 per record: the strong end of what DP fine-tuning reports.
    "dp_sgd": {"defenses": [{"name": "dp_sgd", "target_epsilon": 1.0, "delta": DELTA, "max_grad_norm": 1.0}]},
    # z = 1 on the clipped sum of the clients' updates: user-level, so ε is large with 2 users. Its
    # accountant assumes Poisson client sampling; with q = 2/2 = 1 both clients still train every round.
    "dp_fedavg": {
        "defenses": [{"name": "dp_fedavg", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": DELTA}],
        "federation": {"sampling": "poisson"},
    },
}
"""What each variant changes in the scenario; nothing else differs."""
ACCOUNTANT = {"dp_sgd": "privacy.epsilon", "dp_fedavg": "privacy.user_epsilon"}


def scenario_for(defense: str, out_dir: Path) -> dict:
    """The shipped scenario as :data:`VARIANTS` changes it, audited at :data:`DELTA`, logging to ``out_dir`` only."""
    scenario = yaml.safe_load(SCENARIO.read_text())
    scenario["defenses"] = VARIANTS[defense].get("defenses", [])
    scenario["federation"].update(VARIANTS[defense].get("federation", {}))
    for attack in scenario["attacks"]:
        if attack["name"] == "membership_inference":
            attack["delta"] = DELTA
    scenario["tracking"] = {"enabled": False, "output_dir": str(out_dir)}
    return scenario


def external_methods(scenario: dict) -> list[str]:
    """The methods of the scenario's external membership attack, in its order."""
    return next(
        a["method"] for a in scenario["attacks"]
        if a["name"] == "membership_inference" and a.get("threat", "external") == "external"
    )


def measure(defense: str, out_dir: Path) -> tuple[list[dict], dict]:
    """One run of the scenario under ``defense``: a row per method, and the run's own figures."""
    scenario = scenario_for(defense, out_dir)
    started = time.perf_counter()
    result = fedsec_bench.run(scenario)
    final = result.final
    run = {
        "defense": defense,
        "seed": scenario["seed"],
        "eval_loss": final["utility.eval_loss"],
        "accountant_epsilon": final.get(ACCOUNTANT.get(defense, ""), float("nan")),
        "training_seconds": float(result.metrics["cost.round_seconds"].sum()),
        "run_seconds": time.perf_counter() - started,
        "num_samples": int(final["mia.num_samples"]),
    }
    rows = [
        {
            "method": method,
            "defense": defense,
            "auc": final[f"mia.{method}.auc"],
            "tpr_at_1pct_fpr": final[f"mia.{method}.tpr_at_1pct_fpr"],
            "num_samples": run["num_samples"],
            "eps_lower_bound": final[f"mia.{method}.eps_lower_bound"],
            "accountant_epsilon": run["accountant_epsilon"],
            "attack_seconds": final[f"mia.{method}.seconds"],
        }
        for method in external_methods(scenario)
    ]
    return rows, run


def markdown(table: pd.DataFrame, runs: list[dict], command: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    lines = [
        (
            f"Made by `{command}` on {time.strftime('%Y-%m-%d')}, fedsec-bench {fedsec_bench.__version__}, "
            f"torch {torch.__version__}, {device}, {torch.get_num_threads()} torch thread(s)."
        ),
        "",
        f"# Membership inference on `{SCENARIO.relative_to(ROOT)}`: undefended, DP-SGD, DP-FedAvg",
        "",
        (
            f"One run per defense, seed {runs[0]['seed']}; external threat (black-box access to the final global model). Each run attacks "
            f"{runs[0]['num_samples']} members (training sentences and planted canaries) against as "
            "many non-members, so TPR at 1 % FPR is the TPR at zero false positives; it is given with the "
            "count of members caught. With this many samples an AUC has a standard error of about 0.05. "
            f"ε_lb is the attack's 95 % Clopper–Pearson lower bound on ε at δ = {DELTA:g} (Bonferroni over "
            "the methods); the accountant's ε is the defense's own (record-level for DP-SGD, user-level for "
            "DP-FedAvg); an audit bound above it would be a bug. Attack seconds include the reference or "
            "shadow models a method trains (the shadows are shared by lira* and rmia*, and counted in each)."
        ),
        "",
        "| defense | eval loss | accountant ε | training s (all rounds) | whole run s (pretraining, training, every attack) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        eps = "—" if pd.isna(run["accountant_epsilon"]) else f"{run['accountant_epsilon']:.3g}"
        lines.append(
            f"| {run['defense']} | {run['eval_loss']:.2f} | {eps} | {run['training_seconds']:.1f} | {run['run_seconds']:.1f} |"
        )
    lines += [
        "",
        "| method | defense | AUC | TPR @ 1 % FPR (members caught) | ε_lb | accountant ε | attack s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in table.itertuples():
        caught = round(row.tpr_at_1pct_fpr * row.num_samples)
        eps = "—" if pd.isna(row.accountant_epsilon) else f"{row.accountant_epsilon:.3g}"
        lines.append(
            f"| {row.method} | {row.defense} | {row.auc:.3f} | {row.tpr_at_1pct_fpr:.3f} ({caught}/{row.num_samples}) "
            f"| {row.eps_lower_bound:.2f} | {eps} | {row.attack_seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "membership", help="folder for table.md/.csv")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1, as in the tests: the tiny models are fastest so)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = " ".join(["python", shlex.quote(str(Path(sys.argv[0]))), *map(shlex.quote, sys.argv[1:])])
    rows, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for defense in VARIANTS:
            defense_rows, run = measure(defense, Path(tmp) / defense)
            rows += defense_rows
            runs.append(run)
            print(f"{defense}: {run['run_seconds']:.0f} s", flush=True)
    table = pd.DataFrame(rows)  # grouped by method (the scenario's order); a stable sort keeps VARIANTS order within
    rank = {method: i for i, method in enumerate(dict.fromkeys(table["method"]))}
    table = table.sort_values("method", key=lambda column: column.map(rank), kind="stable")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    (args.out / "table.md").write_text(markdown(table, runs, command))
    print(f"wrote {args.out / 'table.md'} and {args.out / 'table.csv'}")


if __name__ == "__main__":
    main()
