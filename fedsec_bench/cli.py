"""The ``fedsec`` command: run, validate and list scenarios and plugins."""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

from .errors import ScenarioError

EXIT_BAD_INPUT = 2


def bundled_scenarios() -> dict[str, Path]:
    folder = files("fedsec_bench.scenarios")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def resolve_scenario_path(name: str) -> Path:
    """A path as given, else a bundled scenario by name (``fedsec run quickstart``)."""
    path = Path(name)
    if path.exists() or path.suffix:
        return path
    return bundled_scenarios().get(name, path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_library_logs()
    try:
        return args.command(args)
    except ScenarioError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT


def quiet_library_logs() -> None:
    """Keep the terminal for our progress and results: libraries' info chatter and deprecation notes go."""
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsec", description="Privacy and security benchmark for federated LLM training.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a scenario and log it to MLflow")
    _scenario_args(run)
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary table (for CI)")
    run.set_defaults(command=cmd_run)

    validate = sub.add_parser("validate", help="check a scenario without running it")
    _scenario_args(validate)
    validate.set_defaults(command=cmd_validate)

    listing = sub.add_parser("list", help="list attacks, defenses and bundled scenarios")
    listing.set_defaults(command=cmd_list)
    return parser


def _scenario_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="a scenario YAML file, or the name of a bundled scenario")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
        help="override a field, e.g. --set federation.rounds=5 (repeatable; VALUE is YAML)",
    )


def cmd_validate(args) -> int:
    from .scenario import load_scenario

    scenario = load_scenario(resolve_scenario_path(args.scenario), args.overrides)
    print(f"{scenario.name}: ok ({scenario.tuning.mode}, {scenario.federation.rounds} rounds, "
          f"{len(scenario.defenses)} defenses, {len(scenario.attacks)} attacks)")
    return 0


def cmd_run(args) -> int:
    from tqdm import tqdm

    from .reporting import summary_table
    from .runner import run
    from .scenario import load_scenario

    scenario = load_scenario(resolve_scenario_path(args.scenario), args.overrides)
    bar = tqdm(total=scenario.federation.rounds, desc=scenario.name, unit="round", disable=args.quiet, file=sys.stderr)

    def on_round(rnd: int, metrics: dict[str, float]) -> None:
        shown = {k.split(".")[-1]: f"{v:.4g}" for k, v in metrics.items() if k in PROGRESS_METRICS}
        bar.set_postfix(shown, refresh=False)
        bar.update(1)

    try:
        result = run(scenario, on_round=on_round)
    finally:
        bar.close()
    if not args.quiet:
        print(summary_table(result.final))
        print(f"\nrun folder: {result.run_dir}")
        if result.run_id:
            print(f"mlflow run: {result.run_id}  (mlflow ui --backend-store-uri {scenario.tracking.uri})")
    return 0


PROGRESS_METRICS = ("train.loss", "utility.eval_loss", "utility.perplexity")


def cmd_list(args) -> int:
    from .plugins import registry

    plugins = registry()
    for kind in ("attack", "defense", "aggregator"):
        print(f"{kind}s:")
        for name, cls in sorted(plugins.items()):
            if cls.kind == kind:
                print(f"  {name:<24} modes: {','.join(sorted(cls.modes)):<18} hooks: {', '.join(cls.hooks())}")
                if cls.summary:
                    print(f"  {'':<24} {cls.summary}")
    print("scenarios:")
    for name, path in sorted(bundled_scenarios().items()):
        print(f"  {name:<24} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
