r"""What does a malicious server gain by gradient ascent (Nasr et al. 2019)? Passive and active membership AUCs.

On one small setting (tests/test_active_membership.py's: a tiny GPT-2 from scratch, two
clients of 16 records, local SGD, the last of two rounds attacked), for each seed:

- (a) ``membership_inference`` with ``threat: server``, method ``loss``: the honest-but-curious
  server's loss attack on the target's local model (global + its update);
- (b) ``active_membership`` with ``ascent_steps: 0``: the honest model sent, the loss-drop
  statistic (the passive control); (a) and (b) share one run;
- (c) ``active_membership`` with gradient ascent on the candidates before sending.

Each attack draws its own 16 members and 16 held-out non-members (an AUC's standard error is
then about 0.07-0.10). It writes the mean and standard deviation over the seeds, then one row
per seed; the first line of the output records the command that wrote it.

    python benchmarks/active_membership_table.py               # results/malicious_server_membership.md
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

import fedsec_bench

ROOT = Path(__file__).resolve().parent.parent
SETTING = {
    "name": "active_mia",
    "model": {"arch": "gpt2", "layers": 1, "hidden": 32, "heads": 2, "max_positions": 64,
              "tokenizer": {"kind": "bpe", "vocab_size": 300}},
    "tuning": {"mode": "full"},
    "data": {"examples_per_client": 16, "heldout_examples": 32, "seq_len": 32, "canaries": {"count": 0}},
    "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 2, "local_steps": 2,
                   "batch_size": 8, "optimizer": "sgd", "lr": 0.3},
    "tracking": {"enabled": False},
    "device": "cpu",
}
FIGURES = ("auc", "tpr_at_1pct_fpr")


def run(seed: int, attacks: list[dict], out_dir: Path) -> dict[str, float]:
    scenario = copy.deepcopy(SETTING) | {"seed": seed, "attacks": attacks}
    scenario["tracking"]["output_dir"] = str(out_dir)
    return fedsec_bench.run(scenario).final


def seed_row(seed: int, steps: int, lr: float, out_dir: Path) -> dict[str, float]:
    """(a), (b) and (c)'s figures for one seed."""
    passive = run(seed, [{"name": "membership_inference", "threat": "server", "method": "loss"},
                         {"name": "active_membership", "ascent_steps": 0}], out_dir)
    active = run(seed, [{"name": "active_membership", "ascent_steps": steps, "ascent_lr": lr}], out_dir)
    row = {"seed": seed}
    for label, final, prefix in (("(a) server loss", passive, "mia.server."),
                                 ("(b) passive control", passive, "mia.active."),
                                 ("(c) active", active, "mia.active.")):
        for figure in FIGURES:
            row[f"{label} {figure}"] = final[prefix + figure]
    return row


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per attack: each figure's mean ± standard deviation over the seeds."""
    rows = []
    for label in ("(a) server loss", "(b) passive control", "(c) active"):
        cells = {"attack": label}
        for figure in FIGURES:
            column = table[f"{label} {figure}"]
            cells[figure] = f"{column.mean():.3f} ± {column.std(ddof=1):.3f}"
        rows.append(cells)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--ascent-steps", type=int, default=5)
    parser.add_argument("--ascent-lr", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "malicious_server_membership.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        table = pd.DataFrame([seed_row(s, args.ascent_steps, args.ascent_lr, Path(tmp)) for s in range(args.seeds)])
    command = "python " + shlex.join(["benchmarks/active_membership_table.py", *sys.argv[1:]])
    text = (
        f"`{command}`\n\n"
        f"Setting: tiny GPT-2 (1 layer, width 32) from scratch, full tuning, 2 clients × 16 records, local SGD "
        f"(lr 0.3, 2 steps), round 2 of 2 attacked, 16 members against 16 held-out non-members; "
        f"(c) ascends {args.ascent_steps} steps of lr {args.ascent_lr}. Mean ± standard deviation over seeds "
        f"0-{args.seeds - 1}; with 16 non-members TPR at 1% FPR is the TPR at zero false positives.\n\n"
        f"{summary(table).to_markdown(index=False)}\n\nPer seed:\n\n"
        f"{table.to_markdown(index=False, floatfmt=['.0f'] + ['.3f'] * (table.shape[1] - 1))}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
