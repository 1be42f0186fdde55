"""The ``fedsec`` command: run, validate and list scenarios and plugins."""

from __future__ import annotations

import argparse
import gc
import sys
from functools import partial
from importlib.resources import files
from pathlib import Path

from .errors import Diverged, ScenarioError, excerpt
from .interruption import Interrupted, stop_on_signals

EXIT_FAILED = 1
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


def console() -> int:
    """The ``fedsec`` command: :func:`main`, then a quick exit. Python's final garbage collection over
    torch's, transformers' and MLflow's objects takes about 2 s at exit (most of the time a SIGTERM
    took to end a run); frozen, it is skipped, and the process's memory goes back all the same."""
    code = main()
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run failed or a figure regressed, 2 bad input (nothing recorded),
    128 + signal number when SIGINT (130) or SIGTERM (143) stopped a run (recorded as KILLED)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_library_logs()
    if getattr(args, "jobs", None) is not None and args.jobs < 1:
        parser.error("--jobs must be ≥ 1")
    try:
        return args.command(args)
    except ScenarioError as exc:
        # fedsec_bench.runner.Refused (run, validate) reports by stage; any other ScenarioError is its problems
        report = exc.report() if hasattr(exc, "report") else [f"error: {problem}" for problem in exc.problems]
        print("\n".join(report), file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        print(f"\n{exc}{_where(exc, args)}", file=sys.stderr)
        return exc.exit_code
    except Diverged as exc:
        if args.debug:
            raise
        print(f"error: {exc}{_where(exc, args)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a bug, not the input's fault: one line unless --debug asks for the traceback
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {excerpt(str(exc), 500)}\n"
              "This is a bug in fedsec-bench or in a plugin, not in your scenario; rerun with --debug for the "
              "traceback, and report it.", file=sys.stderr)
        return EXIT_FAILED


def _where(stop: BaseException, args) -> str:
    """Where a stopped run's record is, and how to go on from it (``stop.record``: the run's
    :class:`~fedsec_bench.tracking.Tracker`, attached by :func:`fedsec_bench.runner.run`)."""
    record = getattr(stop, "record", None)
    if record is None:
        return " (no run was recorded)"
    lines = f"\nthe run is marked {record.status} after round {record.completed_rounds}: {record.run_dir}"
    if record.resumable and isinstance(stop, Interrupted):
        lines += f"\ncontinue it with: fedsec run {args.scenario} --resume {record.run_id or record.run_dir.name}"
    return lines


def quiet_library_logs() -> None:
    """Keep the terminal for our progress and results: libraries' info chatter and deprecation notes go."""
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights": our own bar is the run's progress
    datasets_logging.disable_progress_bar()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # a bad file's error is ours to report, with its field


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsec", description="Privacy and security benchmark for federated LLM training.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    sub.add_parser = partial(sub.add_parser, parents=[common])

    run = sub.add_parser("run", help="run a scenario and log it to MLflow")
    _scenario_args(run)
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary table (for CI)")
    run.add_argument("--resume", metavar="RUN_ID",
                     help="continue this interrupted run (its MLflow run id, or its folder's name when untracked) "
                     "from its latest checkpoint, into the same run")
    run.set_defaults(command=cmd_run)

    runs = sub.add_parser("runs", help="list runs; --stale finds runs left RUNNING by a process that died")
    runs.add_argument("--stale", action="store_true", required=True,
                      help="RUNNING runs whose process is gone (killed, or its machine went down)")
    runs.add_argument("--mark", action="store_true", help="mark the stale runs KILLED (tag fedsec.stale=true)")
    runs.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    runs.add_argument("--experiment", default=None, help="only this experiment")
    runs.set_defaults(command=cmd_runs)

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

    compare = sub.add_parser(
        "compare", help="one table (and plots) comparing runs from MLflow",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A table a paper can use: a row per configuration (runs that differ only by seed are one\n"
                    "row: n, mean and 95% Student-t CI); columns ordered parameters (defenses and attacks with\n"
                    "their options), utility, privacy, security, cost, then the rest; columns the same in every\n"
                    "run are left out (--all keeps them).",
        epilog="written to --out:\n"
               "  comparison.csv          a row per configuration: n, <figure>.mean, <figure>.ci95\n"
               "  comparison.md/.tex      the same as mean ± ci (LaTeX: booktabs tabular)\n"
               "  comparison_runs.csv     a row per run (every seed)\n"
               "  privacy_utility_frontier_<family>.png  per privacy family present (membership, inversion,\n"
               "                          epsilon, canary, probe): privacy figure against utility\n"
               "  defense_attack_heatmap.png  the headline security figure per defense x attack, when both vary\n"
               "  curves_overlaid.png     eval loss and perplexity per round, one line per run\n"
               "with --parent they are also logged to the parent run under comparison/.",
    )
    which = compare.add_mutually_exclusive_group(required=True)
    which.add_argument("--parent", metavar="RUN_ID", help="the children of a sweep's parent run")
    which.add_argument("--experiment", metavar="NAME", help="every scenario run of an experiment")
    which.add_argument("--runs", nargs="+", metavar="RUN_ID", help="these runs")
    compare.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    compare.add_argument("--out", default="fedsec-compare", help="folder for the tables and plots (default: %(default)s)")
    compare.add_argument("--all", action="store_true",
                         help="keep the columns that are the same in every run (defense and attack options included)")
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
    """Every check ``run`` makes before it records a run (:func:`fedsec_bench.runner.preflight`: the
    schema, no matrix, the plugins, where results go, the device, the data itself and the model, loaded
    or built and tuned, not pretrained), every problem at once; then what the run would train."""
    from .runner import preflight

    runtime = preflight(resolve_scenario_path(args.scenario), args.overrides, pretrained=False).runtime
    scenario, data = runtime.scenario, runtime.data
    sizes = [data.num_examples(c) for c in range(data.num_clients)]
    trainable = sum(p.numel() for p in runtime.model.parameters() if p.requires_grad)
    print(f"{scenario.name}: ok ({scenario.tuning.mode}, {scenario.federation.rounds} rounds, "
          f"{len(scenario.defenses)} defenses, {len(scenario.attacks)} attacks)")
    print(f"  data: {data.num_clients} clients with {min(sizes)}-{max(sizes)} examples ({sum(sizes)} in all), "
          f"{len(data.heldout)} held out, {len(data.public)} public, {len(data.canaries)} canaries")
    print(f"  model: {trainable:,} trainable parameters, vocabulary {len(runtime.tokenizer):,}, on {runtime.device.type}")
    for name, value in data.counts.items():
        print(f"  {name}: {value:g}")
    return 0


def cmd_run(args) -> int:
    from tqdm import tqdm

    from . import progress
    from .reporting import summary_table
    from .runner import preflight, run

    with progress.shown(not args.quiet):
        with stop_on_signals():  # pretraining may take a while: a signal ends it as it ends a run
            prepared = preflight(resolve_scenario_path(args.scenario), args.overrides, args.resume)
        scenario = prepared.plan.scenario
        bar = tqdm(total=scenario.federation.rounds, initial=prepared.restart.round if prepared.restart else 0,
                   desc=scenario.name, unit="round", disable=args.quiet, file=sys.stderr)

        def on_round(rnd: int, metrics: dict[str, float]) -> None:
            shown = {k.split(".")[-1]: f"{v:.4g}" for k, v in metrics.items() if k in PROGRESS_METRICS}
            bar.set_postfix(shown, refresh=False)
            bar.update(1)

        try:
            result = run(prepared, on_round=on_round)
        finally:
            bar.close()
    if not args.quiet:
        print(summary_table(result.final))
        print(f"\nrun folder: {result.run_dir}")
        if result.run_id:
            print(f"mlflow run: {result.run_id}  (mlflow ui --backend-store-uri {scenario.tracking.uri})")
    return 0


PROGRESS_METRICS = ("train.loss", "utility.eval_loss", "utility.perplexity")


def cmd_runs(args) -> int:
    from .liveness import mark_stale, stale_runs
    from .store import sqlite_path

    database = sqlite_path(args.uri) if args.uri.startswith("sqlite:") else None
    if database is not None and not database.is_file():  # MLflow would create an empty store to list nothing
        raise ScenarioError(f"--uri: no tracking store at {database}; give the URI your runs log to (tracking.uri)")
    stale = stale_runs(args.uri, experiment=args.experiment)
    for run in stale:
        print(f"{run.run_id}  {run.scenario or '?':<24} started {run.started}  {run.reason}")
    if not stale:
        print(f"no stale runs in {args.uri}")
    elif args.mark:
        mark_stale(args.uri, [r.run_id for r in stale], reasons={r.run_id: r.reason for r in stale})
        print(f"\n{len(stale)} marked KILLED")
    else:
        print(f"\n{len(stale)} stale; --mark marks them KILLED")
    return 0


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

    ended: list[str] = []

    def on_child(outcome) -> None:
        ended.append(outcome.status)
        tally = f"[{len(ended)}/{len(children)} done, {ended.count('FAILED')} failed]"
        print(f"  {tally} {outcome.status:<8} {outcome.label}" + (f"  ({outcome.error})" if outcome.error else ""),
              file=sys.stderr)

    parent, outcomes, runs = run_sweep(path, args.overrides, args.jobs, on_child, args.executor)
    if runs is not None:
        print_comparison(runs, keep_constant=False)
    failed = [o.label for o in outcomes if o.status == "FAILED"]
    print(f"\n{len(outcomes) - len(failed)} finished, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    if parent:
        print(f"parent run: {parent}  (fedsec compare --parent {parent} --uri {base.tracking.uri})")
    return EXIT_FAILED if failed else 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from .compare import compare_runs, find_run_ids, log_comparison
    from .comparison_table import drop_constant

    try:
        ids = args.runs or find_run_ids(args.uri, parent=args.parent, experiment=args.experiment)
    except ValueError as exc:
        raise ScenarioError(str(exc)) from None
    if not ids:
        raise ScenarioError("no runs found to compare; check --uri, --parent or --experiment")
    runs = compare_runs(args.uri, ids)
    files = log_comparison(runs, args.uri, Path(args.out), keep_constant=args.all)
    if args.parent:
        client = MlflowClient(tracking_uri=args.uri)
        for path in files:
            client.log_artifact(args.parent, str(path), artifact_path="comparison")
        client.log_table(args.parent, data=runs if args.all else drop_constant(runs),
                         artifact_file="comparison/comparison.json")
    print_comparison(runs, keep_constant=args.all)
    print(f"\nsaved: {', '.join(str(p) for p in files)}")
    return 0


def print_comparison(runs, keep_constant: bool) -> None:
    """The seed-aggregated table and, for a defense x attack matrix, each defense's worst case."""
    from .comparison_table import aggregate_seeds, drop_constant, readable
    from .robustness import verdict

    print(readable(aggregate_seeds(runs if keep_constant else drop_constant(runs))).to_string(index=False))
    worst = verdict(runs)
    if worst is not None:
        print("\nworst case over the attacks, per defense (f: declared; malicious: really attacking):")
        print(worst.to_string(index=False))


def cmd_check(args) -> int:
    from pathlib import Path

    from .check import check_baseline, find_baselines, format_rows, select_baselines

    rows = []
    for path in select_baselines(find_baselines(Path(args.baselines)), args.scenarios):
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
    from .scenario import header_comment

    print("scenarios:")
    for name, path in sorted(bundled_scenarios().items()):
        print(f"  {name:<24} {path}")
        if header := header_comment(Path(path).read_text(encoding="utf-8")):
            print(f"  {'':<24} {header.splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(console())
