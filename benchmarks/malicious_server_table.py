"""Honest vs malicious server across the defenses: what gradient inversion reads under each.

Runs every child of ``scenarios/malicious_server_sweep.yaml`` (the same expansion ``fedsec sweep``
makes) through the public API, untracked, and writes one row per (server, defense): what the
server could attack (single plain updates, an isolated update, or only the aggregate), the
span check's recovery on it, and the malicious server's own figures.

    python benchmarks/malicious_server_table.py     # writes results/malicious_server.md

The first line of the table's file records the command that wrote it.
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import torch

import fedsec_bench
from fedsec_bench.scenario import read_yaml
from fedsec_bench.sweep import expand

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "scenarios" / "malicious_server_sweep.yaml"
OUT = ROOT / "results" / "malicious_server.md"


def attacked(figures: dict) -> tuple[str, str]:
    """What the attack read (its figures' prefix) and how the server came by it."""
    if figures.get("imprint.attacked_clients"):
        return "imprint", "plain updates (imprint)"
    if "imprint.aggregate.token_recall" in figures:
        return "imprint.aggregate", "aggregate (imprint)"
    if figures.get("inversion.isolated_clients"):
        return "inversion", "isolated update"
    if figures.get("inversion.attacked_clients"):
        return "inversion", "plain updates"
    if "inversion.aggregate.exact_match" in figures:
        return "inversion.aggregate", "aggregate only"
    return "", "nothing (no update arrived)"


def row(label: str, figures: dict, seconds: float) -> list[str]:
    server = ("malicious: imprint" if "imprint.attacked_clients" in figures else
              "malicious: inconsistency" if "inconsistency.crafted_clients" in figures else "honest")
    defenses = label.split("defenses=")[1]
    prefix, what = attacked(figures)

    def show(key: str, digits: int = 2) -> str:
        value = figures.get(key)
        return "–" if value is None else f"{value:.{digits}g}" if "error" in key else f"{value:.{digits}f}"

    read = [show(f"{prefix}.{k}") for k in ("token_recall", "exact_match", "rouge1", "rank_condition")] if prefix else ["–"] * 4
    return [server, defenses, what, *read, show("inconsistency.isolated", 0), show("inconsistency.isolation_error"),
            show("consistency.refused_clients", 0), show("privacy.user_epsilon"), f"{seconds:.1f}"]


def main() -> None:
    _, children = expand(read_yaml(SWEEP))
    header = ["server", "defenses", "attack read", "token recall", "exact match", "ROUGE-1", "rank condition",
              "isolated", "isolation error", "refused clients", "user ε", "seconds"]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for child in children:
            scenario = child.plan.scenario.model_copy(deep=True)
            scenario.tracking.enabled, scenario.tracking.output_dir = False, out
            started = time.perf_counter()
            figures = fedsec_bench.run(scenario).final
            rows.append(row(child.label, figures, time.perf_counter() - started))
            print(" | ".join(rows[-1]), flush=True)
    command = "python benchmarks/malicious_server_table.py"
    lines = [
        f"Written by `{command}` (fedsec-bench {fedsec_bench.__version__}, torch {torch.__version__}, "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads) from `scenarios/malicious_server_sweep.yaml`.",
        "",
        "FedSGD, full mode, 6 clients of batch 2 a round. Honest server: gradient inversion (DAGER span check). "
        "Malicious, inconsistency: it sends the target the real model and the others an all-zero model (Pasquini et "
        "al. CCS 2022), then runs the same span check. Malicious, imprint: every client gets GPT-2's first MLP turned "
        "into a trap layer (Fowl et al. ICLR 2022). Token recall, exact match and ROUGE-1: higher means more of the "
        "clients' text recovered (1 = exact). Isolation error: relative L2 distance of the isolated update to the "
        "target's true plain update.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
