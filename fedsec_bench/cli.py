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
    if getattr(args, "jobs", None) is not None and args.jobs < 1:
        parser.error("--jobs must be ≥ 1")
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

    sweep = sub.add_parser("sweep", help="run every combination of a scenario's matrix under one parent run")
    _scenario_args(sweep)
    sweep.add_argument("--executor", choices=["processes", "ray"], default="processes",
                       help="run children in spawned processes here, or as Ray tasks (default: %(default)s)")
    sweep.add_argument("--jobs", type=int, default=None,
                       help="children at once (default: 1 with processes; with ray, as many as the cluster's CPUs allow)")
    sweep.add_argument("--dry-run", action="store_true", help="list the combinations and exit")
    sweep.set_defaults(command=cmd_sweep)

    compare = sub.add_parser("compare", help="one table (and plots) comparing runs from MLflow")
    which = compare.add_mutually_exclusive_group(required=True)
    which.add_argument("--parent", metavar="RUN_ID", help="the children of a sweep's parent run")
    which.add_argument("--experiment", metavar="NAME", help="every scenario run of an experiment")
    which.add_argument("--runs", nargs="+", metavar="RUN_ID", help="these runs")
    compare.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    compare.add_argument("--out", default="fedsec-compare", help="folder for the CSV, Markdown and plots")
    compare.set_defaults(command=cmd_compare)

    check = sub.add_parser("check", help="run baseline scenarios; exit 1 if a figure regressed")
    check.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="only these (baseline or scenario names)")
    check.add_argument("--baselines", default="results/baselines", help="folder of baseline JSON files")
    check.add_argument("--update", action="store_true", help="record the new figures as the baselines")
    check.set_defaults(command=cmd_check)
    return parser


def _scenario_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="a scenario YAML file, or the name of a bundled scenario")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
        help="override a field, e.g. --set federation.rounds=5 (repeatable; VALUE is YAML)",
    )


def cmd_validate(args) -> int:
    """Everything ``run`` checks before it records a run: the schema, the plugins, and the data itself."""
    from .data import build_federated_data
    from .plan import load_plan

    plan = load_plan(resolve_scenario_path(args.scenario), args.overrides)
    scenario = plan.scenario
    data = build_federated_data(scenario)
    plan.check_data(data)
    sizes = [data.num_examples(c) for c in range(data.num_clients)]
    print(f"{scenario.name}: ok ({scenario.tuning.mode}, {scenario.federation.rounds} rounds, "
          f"{len(scenario.defenses)} defenses, {len(scenario.attacks)} attacks)")
    print(f"  data: {data.num_clients} clients with {min(sizes)}-{max(sizes)} examples ({sum(sizes)} in all), "
          f"{len(data.heldout)} held out, {len(data.public)} public, {len(data.canaries)} canaries")
    for name, value in data.counts.items():
        print(f"  {name}: {value:g}")
    return 0


def cmd_run(args) -> int:
    from tqdm import tqdm

    from .reporting import summary_table
    from .plan import load_plan
    from .runner import run

    plan = load_plan(resolve_scenario_path(args.scenario), args.overrides)
    scenario = plan.scenario
    bar = tqdm(total=scenario.federation.rounds, desc=scenario.name, unit="round", disable=args.quiet, file=sys.stderr)

    def on_round(rnd: int, metrics: dict[str, float]) -> None:
        shown = {k.split(".")[-1]: f"{v:.4g}" for k, v in metrics.items() if k in PROGRESS_METRICS}
        bar.set_postfix(shown, refresh=False)
        bar.update(1)

    try:
        result = run(plan, on_round=on_round)
    finally:
        bar.close()
    if not args.quiet:
        print(summary_table(result.final))
        print(f"\nrun folder: {result.run_dir}")
        if result.run_id:
            print(f"mlflow run: {result.run_id}  (mlflow ui --backend-store-uri {scenario.tracking.uri})")
    return 0


PROGRESS_METRICS = ("train.loss", "utility.eval_loss", "utility.perplexity")
EXIT_FAILED = 1


def cmd_sweep(args) -> int:
    from .scenario import read_yaml
    from .sweep import expand, run_sweep

    path = resolve_scenario_path(args.scenario)
    base, children = expand(read_yaml(path), args.overrides)
    if args.dry_run:
        print(f"{base.name}: {len(children)} combinations")
        for i, child in enumerate(children, 1):
            print(f"  {i:>3}. {child.label}")
        return 0
    at_once = args.jobs or (1 if args.executor == "processes" else "as many as Ray's CPUs allow")
    print(f"{base.name}: running {len(children)} combinations on {args.executor}, {at_once} at once", file=sys.stderr)

    def on_child(outcome) -> None:
        print(f"  {outcome.status:<8} {outcome.label}" + (f"  ({outcome.error})" if outcome.error else ""),
              file=sys.stderr)

    parent, outcomes, frame = run_sweep(path, args.overrides, args.jobs, on_child, args.executor)
    if frame is not None:
        print(frame.drop(columns=["run_id"]).to_string(index=False))
    failed = [o.label for o in outcomes if o.status == "FAILED"]
    print(f"\n{len(outcomes) - len(failed)} finished, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    if parent:
        print(f"parent run: {parent}  (fedsec compare --parent {parent} --uri {base.tracking.uri})")
    return EXIT_FAILED if failed else 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from .compare import compare_runs, find_run_ids, log_comparison

    try:
        ids = args.runs or find_run_ids(args.uri, parent=args.parent, experiment=args.experiment)
    except ValueError as exc:
        raise ScenarioError(str(exc)) from None
    if not ids:
        raise ScenarioError("no runs found to compare; check --uri, --parent or --experiment")
    frame = compare_runs(args.uri, ids)
    files = log_comparison(frame, args.uri, Path(args.out))
    if args.parent:
        client = MlflowClient(tracking_uri=args.uri)
        for path in files:
            client.log_artifact(args.parent, str(path), artifact_path="comparison")
        client.log_table(args.parent, data=frame, artifact_file="comparison/comparison.json")
    print(frame.drop(columns=["run_id"]).to_string(index=False))
    print(f"\nsaved: {', '.join(str(p) for p in files)}")
    return 0


def cmd_check(args) -> int:
    from pathlib import Path

    from .check import check_baseline, format_rows, select_baselines

    rows = []
    for path in select_baselines(Path(args.baselines), args.scenarios):
        print(f"checking {path} ...", file=sys.stderr)
        rows += check_baseline(path, update=args.update)
    print(format_rows(rows))
    if args.update:
        print(f"\nbaselines updated in {args.baselines}: review the diff before committing")
        return 0
    regressed = [f"{r.baseline}:{r.metric}" for r in rows if r.failed]
    print(f"\n{len(rows) - len(regressed)} ok, {len(regressed)} regressed" + (f": {', '.join(regressed)}" if regressed else ""))
    return EXIT_FAILED if regressed else 0


def cmd_list(args) -> int:
    from .registry import list_plugins

    listings = list_plugins()
    for kind in ("attack", "defense", "aggregator"):
        print(f"{kind}s:")
        for item in listings:
            cls = item.plugin
            if cls is not None and cls.kind == kind:
                print(f"  {item.name:<24} modes: {','.join(sorted(cls.modes)):<18} hooks: {', '.join(cls.hooks())}")
                if cls.summary:
                    print(f"  {'':<24} {cls.summary}")
                if cls.on_instruction_data:
                    print(f"  {'':<24} instruction data: {cls.on_instruction_data}")
    unavailable = [item for item in listings if item.unavailable is not None]
    if unavailable:
        print("unavailable here (scenarios that use them are refused):")
        for item in unavailable:
            print(f"  {item.name:<24} {item.unavailable.reason}")
            print(f"  {'':<24} {item.unavailable.fix}")
    print("scenarios:")
    for name, path in sorted(bundled_scenarios().items()):
        print(f"  {name:<24} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
