"""Record-level and user-level leakage of one overfit federation under each DP defense.

Runs ``scenarios/user_privacy.yaml`` (no defense) and the same setting under dp_sgd (record-level
DP), dp_fedavg and dp_ftrl (user-level DP) and local_dp (each client's update privatised), through
the public API, untracked. Each run scores ``user_inference`` (external and server threats) and the
record-level ``membership_inference`` (loss attack). The one-shot ε estimate (``user_audit``) runs in a
separate child per user-level defense: its canary clients send random directions instead of their
data, so beside ``user_inference`` they would be counted as member users who left no trace.

    python benchmarks/user_privacy_table.py             # writes the data file, runs, writes results/user_privacy.md
    python benchmarks/user_privacy_table.py --data-only # only (re)writes scenarios/data/users_signed.jsonl

The data file is :func:`~fedsec_bench.data.synthetic.signed_per_user_records` (deterministic): ``per_user_records`` with every user signing
their responses with a made-up name of their own, the feature a user's records share (as Enron
emails carry signatures) that gives the user-level attack a signal to find.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

import fedsec_bench
from fedsec_bench.data.synthetic import signed_per_user_records
from fedsec_bench.scenario import read_yaml

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "user_privacy.yaml"
DATA = ROOT / "scenarios" / "data" / "users_signed.jsonl"
OUT = ROOT / "results" / "user_privacy.md"
DATA_SEED, NUM_USERS, MEDIAN_RECORDS = 1, 56, 28

CLIP = 1.0  # every defense's L2 clip norm, and the canaries' norm
DEFENSES = {
    "none": [],
    "dp_sgd": [{"name": "dp_sgd", "target_epsilon": 4.0, "max_grad_norm": CLIP}],
    "dp_fedavg": [{"name": "dp_fedavg", "noise_multiplier": 2.0, "clip_norm": CLIP}],
    "dp_ftrl": [{"name": "dp_ftrl", "noise_multiplier": 2.0, "clip_norm": CLIP}],
    "local_dp": [{"name": "local_dp", "epsilon": 0.9, "clipping_norm": CLIP}],
}
AUDITED = ["none", "dp_fedavg", "dp_ftrl", "local_dp"]  # the defenses whose unit is the user
CANARIES, AUDIT_CLIENTS = 8, 22  # the audit child adds 8 canary clients to the 14 real ones


def write_data() -> None:
    DATA.write_text("".join(json.dumps(r) + "\n" for r in signed_per_user_records(DATA_SEED, NUM_USERS, MEDIAN_RECORDS)))


def attack_child(base: dict, defense: str) -> dict:
    child = copy.deepcopy(base)
    child["defenses"] = DEFENSES[defense]
    return child


def audit_child(base: dict, defense: str) -> dict:
    """The setting with 8 more clients, all canaries, and user_audit as the only attack."""
    child = attack_child(base, defense)
    child["federation"].update(num_clients=AUDIT_CLIENTS, clients_per_round=AUDIT_CLIENTS)
    child["attacks"] = [{"name": "user_audit", "count": CANARIES, "canary_norm": CLIP}]
    return child


def run(raw: dict, out: str) -> tuple[dict, float]:
    scenario = fedsec_bench.load_scenario(raw)
    scenario.tracking.enabled, scenario.tracking.output_dir = False, out
    started = time.perf_counter()
    final = fedsec_bench.run(scenario).final
    return final, time.perf_counter() - started


def show(figures: dict, key: str, digits: int = 2) -> str:
    value = figures.get(key)
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else f"{value:.{digits}f}"


def null_se(members: float, nonmembers: float) -> float:
    """Standard error of the Mann-Whitney AUC when members and non-members score alike (AUC 0.5)."""
    return math.sqrt((members + nonmembers + 1) / (12 * members * nonmembers))


def row(defense: str, f: dict, audit: dict, seconds: float) -> list[str]:
    return [
        defense, show(f, "utility.eval_loss"),
        show(f, "mia.auc"), show(f, "mia.tpr_at_1pct_fpr"),
        show(f, "user_mia.auc_m1"), show(f, "user_mia.auc_m4"), show(f, "user_mia.auc"),
        show(f, "user_mia.tpr_at_1pct_fpr"),
        show(f, "user_mia.server.auc"), show(f, "user_mia.server.tpr_at_1pct_fpr"),
        show(f, "privacy.epsilon"), show(f, "privacy.user_epsilon"), show(f, "privacy.local_epsilon"),
        show(audit, "privacy.user_eps_estimate"), show(audit, "privacy.user_epsilon"),
        show(audit, "privacy.local_epsilon"), f"{seconds:.0f}",
    ]


HEADER = ["defense", "eval loss", "record AUC", "record TPR@1%", "user AUC m=1", "user AUC m=4", "user AUC m=16",
          "user TPR@1% m=16", "server user AUC m=16", "server user TPR@1% m=16", "record ε (dp_sgd)",
          "user ε (accountant)", "local ε", "user ε estimate (audit)", "audit run: user ε", "audit run: local ε",
          "seconds"]


def counts_line(first: dict) -> str:
    members, nonmembers = first["user_mia.members"], first["user_mia.nonmembers"]
    se = null_se(members, nonmembers)
    return (f"User-level attack: {members:.0f} member users, {nonmembers:.0f} non-member users; under the null "
            f"(no leakage) the AUC's standard error is √((n₁+n₀+1)/(12 n₁ n₀)) = {se:.3f}, so an AUC within "
            f"0.5 ± {2 * se:.2f} is indistinguishable from chance (2 SE). Record-level attack: "
            f"{first['mia.num_samples']:.0f} member records and as many non-members (null SE "
            f"{null_se(first['mia.num_samples'], first['mia.num_samples']):.3f}). With 1 % FPR below 1/{nonmembers:.0f}, "
            "the user TPR@1% is the TPR at zero false positives.")


READING = "## Reading"


def kept_reading() -> str:
    """The hand-written reading of an earlier table, kept below the new one: reread it against the new figures."""
    text = OUT.read_text() if OUT.exists() else ""
    return text[text.index(READING):] if READING in text else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-only", action="store_true", help="only write scenarios/data/users_signed.jsonl")
    args = parser.parse_args()
    write_data()
    if args.data_only:
        return
    base = read_yaml(SCENARIO)
    started, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as out:
        for defense in DEFENSES:
            figures, seconds = run(attack_child(base, defense), out)
            audit, audit_seconds = run(audit_child(base, defense), out) if defense in AUDITED else ({}, 0.0)
            results[defense] = row(defense, figures, audit, seconds + audit_seconds)
            results.setdefault("_first", figures)
            print(" | ".join(results[defense]), flush=True)
    first = results.pop("_first")
    total = time.perf_counter() - started
    command = "python benchmarks/user_privacy_table.py"
    settings = "; ".join(f"{d}: {', '.join(f'{k}={v}' for k, v in s[0].items() if k != 'name')}"
                         for d, s in DEFENSES.items() if s)
    lines = [
        "# Record-level and user-level attacks under each DP defense",
        "",
        f"Written by `{command}` (fedsec-bench {fedsec_bench.__version__}, torch {torch.__version__}, "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads) from `scenarios/user_privacy.yaml`, "
        f"in {total / 60:.1f} minutes.",
        "",
        "Setting: tiny GPT-2 (1 layer, hidden 32) trained from scratch, full tuning, on "
        "`scenarios/data/users_signed.jsonl` (56 synthetic users, each signing their responses with a name of their "
        "own); natural partition, one client per user, 14 clients all in every round, 4 rounds of 30 local steps "
        "(overfit on purpose); whole users held out; each client's 16 fresh records (`data.user_samples`) are kept "
        "out of training for the user-level attacker. "
        f"Defenses: {settings}. The ε estimate comes from a separate run per user-level defense with "
        f"{CANARIES} canary clients added ({AUDIT_CLIENTS} clients, canary norm = clip norm {CLIP}; Andrew et al. "
        "2024), whose accountant figures are shown beside it (its δ is 1/(2·22)).",
        "",
        "AUC: 0.5 is chance, higher = more leakage. TPR@1%: true-positive rate at 1 % false positives, higher = more "
        "leakage. ε: lower = more private; ∞ = no guarantee (or, for the estimate, canaries perfectly visible). "
        "Eval loss: lower = more useful. `–`: not meaningful for that defense.",
        "",
        counts_line(first),
        "",
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join("---" for _ in HEADER) + " |",
        *("| " + " | ".join(r) + " |" for r in results.values()),
        "",
    ]
    OUT.write_text("\n".join(lines) + kept_reading())
    print(f"wrote {OUT.relative_to(ROOT)} in {total:.0f} s")


if __name__ == "__main__":
    main()
