r"""Do the calibrated attacks beat the loss attack? Loss, reference and LiRA AUCs of one scenario, seed by seed.

The must-hold of membership inference: on an undefended model trained to overfit, the
loss attack reaches AUC ≥ 0.8 and reference and LiRA (online) do better. With about 36
members per side an AUC has a standard error of about 0.05, so one seed proves little;
this runs ``scenarios/membership.yaml`` (its external attack cut down to these three
methods) for each seed and writes one row per seed. ``--set`` changes the scenario the
way ``fedsec run --set`` does, which gives the controls:

    python benchmarks/membership_seeds.py                                  # results/membership/seeds.md
    python benchmarks/membership_seeds.py --set data.difficulty=uniform --out results/membership/seeds_uniform.md
    python benchmarks/membership_seeds.py --set model.pretrain.steps=0 --out results/membership/seeds_no_pretrain.md
    python benchmarks/membership_seeds.py --set 'data.canaries.repetitions=[1, 1, 8, 8]' \
        --set data.canaries.clients=random --out results/membership/seeds_repeated_canaries.md

The first line of the output records the command that wrote it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import fedsec_bench

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "membership.yaml"
METHODS = ["loss", "reference", "lira"]


def aucs(seed: int, overrides: list[str], out_dir: Path) -> dict[str, float]:
    scenario = yaml.safe_load(SCENARIO.read_text())
    scenario["seed"] = seed
    scenario["attacks"] = [{"name": "membership_inference", "method": METHODS, "canaries": True}]
    scenario["tracking"] = {"enabled": False, "output_dir": str(out_dir)}
    final = fedsec_bench.run(scenario, overrides).final
    return {method: final[f"mia.{method}.auc"] for method in METHODS} | {"num_samples": int(final["mia.num_samples"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=11, help="run seeds 0 .. seeds-1")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="scenario override")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "membership" / "seeds.md")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1, as in the tests)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = " ".join(["python", shlex.quote(sys.argv[0]), *map(shlex.quote, sys.argv[1:])])
    changes = ", ".join(f"`{o}`" for o in args.set) or "none"
    lines = [
        (
            f"Made by `{command}` on {time.strftime('%Y-%m-%d')}, fedsec-bench {fedsec_bench.__version__}, "
            f"torch {torch.__version__}, {args.threads} torch thread(s)."
        ),
        "",
        f"# Loss vs calibrated membership attacks per seed: `{SCENARIO.relative_to(ROOT)}`, changes: {changes}",
        "",
        "External threat, undefended. Holds: loss AUC ≥ 0.8 and reference and LiRA (online) AUCs above it.",
        "",
        "| seed | members | loss AUC | reference AUC | lira AUC | holds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    held = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            row = aucs(seed, args.set, Path(tmp) / str(seed))
            holds = row["loss"] >= 0.8 and row["reference"] > row["loss"] and row["lira"] > row["loss"]
            held += holds
            lines.append(
                f"| {seed} | {row['num_samples']} | {row['loss']:.3f} | {row['reference']:.3f} | {row['lira']:.3f} "
                f"| {'yes' if holds else 'no'} |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"Holds in {held} of {args.seeds} seeds."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
