"""Whether a run's process is alive: the tags that tell, and the runs left RUNNING by a process that died.

A run's status is whatever its process last wrote; a process killed by SIGKILL or a power
cut leaves it RUNNING forever, and MLflow records no process identity or heartbeat. :func:`run_process_tags` and
:func:`heartbeat_tag` record them as tags; :func:`stale_runs` and :func:`mark_stale`
use them.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import ScenarioError


DEFAULT_MAX_SILENCE_S = 3600.0
"""A run on another machine is called stale after this long without a heartbeat. Heartbeats
come once per round, so this must exceed the longest round; an hour suits small models."""

TAG_HOST = "fedsec.host"
TAG_PID = "fedsec.pid"
TAG_PROCESS_START = "fedsec.process_start"
TAG_BOOT_ID = "fedsec.boot_id"
TAG_PID_NAMESPACE = "fedsec.pid_namespace"
TAG_HEARTBEAT = "fedsec.heartbeat"
TAG_STALE = "fedsec.stale"
TAG_STALE_REASON = "fedsec.stale_reason"
TAG_SCENARIO = "fedsec.scenario"

START_TIME_TOLERANCE_S = 1.0
"""Two start times this close are the same process: /proc gives them in clock ticks (10 ms),
and the boot time they are counted from can shift by under a second."""


# --------------------------------------------------------------------------- stale runs


def run_process_tags() -> dict[str, str]:
    """Tags naming the process that runs a run, set once when the run is created.

    ``fedsec.host`` and ``fedsec.pid`` say where it runs; ``fedsec.process_start`` (the
    process's start, Unix seconds) tells the process from a later one that reused its pid;
    ``fedsec.boot_id`` (Linux) tells a run from before a reboot; ``fedsec.pid_namespace``
    (Linux) keeps containers that share a host name from judging each other's pids. Only
    host and pid are always there; the rest is left out where the platform does not tell.
    A first ``fedsec.heartbeat`` is included, so a run that dies before its first round
    is still judged by the heartbeat rule on other machines.
    """
    pid = os.getpid()
    tags = {TAG_HOST: socket.gethostname(), TAG_PID: str(pid)}
    start = process_start_time(pid)
    if start is not None:
        tags[TAG_PROCESS_START] = f"{start:.2f}"
    for key, value in ((TAG_BOOT_ID, _boot_id()), (TAG_PID_NAMESPACE, _pid_namespace())):
        if value:
            tags[key] = value
    return tags | heartbeat_tag()


def heartbeat_tag() -> dict[str, str]:
    """``{"fedsec.heartbeat": now in Unix milliseconds}``: set after every round, it is how a
    run on another machine (whose process cannot be looked up from here) is judged alive."""
    return {TAG_HEARTBEAT: str(int(time.time() * 1000))}


@dataclass(frozen=True)
class StaleRun:
    """A RUNNING run whose process is gone, as :func:`stale_runs` found it."""

    run_id: str
    experiment: str
    scenario: str | None
    start_time: datetime | None
    host: str | None
    pid: int | None
    reason: str
    last_heartbeat: datetime | None = None

    @property
    def started(self) -> str:
        """The start time as listings print it (UTC, to the minute)."""
        return self.start_time.strftime("%Y-%m-%d %H:%M UTC") if self.start_time else "?"


def stale_runs(
    uri: str,
    experiment: str | None = None,
    max_silence_s: float = DEFAULT_MAX_SILENCE_S,
    include_unknown: bool = False,
) -> list[StaleRun]:
    """RUNNING runs in ``experiment`` (all experiments when None) whose process is gone.

    * Same machine (same host name, and same pid namespace where recorded): stale when the
      machine rebooted since the run started (boot id changed), when its pid is not alive
      (or a zombie), or when the pid is alive but belongs to a process started at another
      time (the pid was reused). This is exact where the start time was recorded (Linux, or
      psutil installed); without it a reused pid makes a dead run look alive.
    * Another machine: its processes cannot be looked up from here, so this is a heuristic:
      stale when the last ``fedsec.heartbeat`` (set every round) is older than
      ``max_silence_s``. A round longer than that makes a live run look stale; raise it.
    * Runs without ``fedsec.host`` / ``fedsec.pid`` (started by another tool or by an older
      fedsec-bench) cannot be judged: skipped, or with ``include_unknown`` reported with a
      reason saying so (marking them is then the user's call).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = _experiments(client, experiment)
    here = _Here()
    now_ms = int(time.time() * 1000)
    found = []
    for run in _running_runs(client, list(experiments)):
        tags = run.data.tags
        reason = _stale_reason(tags, run.info.start_time, here, now_ms, max_silence_s)
        if reason is None:
            continue
        if reason == "unknown":
            if not include_unknown:
                continue
            reason = "no fedsec.host/fedsec.pid tags (not started by this fedsec-bench); cannot tell"
        found.append(
            StaleRun(
                run_id=run.info.run_id,
                experiment=experiments[run.info.experiment_id],
                scenario=tags.get(TAG_SCENARIO),
                start_time=_datetime(run.info.start_time),
                host=tags.get(TAG_HOST),
                pid=_int(tags.get(TAG_PID)),
                reason=reason,
                last_heartbeat=_datetime(_int(tags.get(TAG_HEARTBEAT))),
            )
        )
    return found


def mark_stale(uri: str, run_ids: list[str], reasons: dict[str, str] | None = None) -> None:
    """End each run as KILLED and tag it ``fedsec.stale=true`` (and ``fedsec.stale_reason``).

    The end time is the run's last heartbeat where it has one (when it was last seen alive),
    so its duration in the MLflow UI is not inflated by the time it sat dead. Runs that are no
    longer RUNNING (they finished meanwhile, or were marked already) are left alone.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for run_id in run_ids:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            continue
        client.set_tag(run_id, TAG_STALE, "true")
        if reasons and run_id in reasons:
            client.set_tag(run_id, TAG_STALE_REASON, reasons[run_id][:500])
        heartbeat = _int(run.data.tags.get(TAG_HEARTBEAT))
        client.set_terminated(run_id, "KILLED", end_time=heartbeat or int(time.time() * 1000))


def _stale_reason(tags: dict, start_ms: int | None, here: _Here, now_ms: int, max_silence_s: float) -> str | None:
    host, pid = tags.get(TAG_HOST), _int(tags.get(TAG_PID))
    if not host or pid is None:
        return "unknown"
    namespace = tags.get(TAG_PID_NAMESPACE)
    same_machine = host == here.host and (not namespace or not here.pid_namespace or namespace == here.pid_namespace)
    if same_machine:
        boot_id = tags.get(TAG_BOOT_ID)
        if boot_id and here.boot_id and boot_id != here.boot_id:
            return f"{host} rebooted since the run started (boot id changed)"
        if not pid_alive(pid):
            return f"process {pid} on {host} is gone"
        recorded, actual = _float(tags.get(TAG_PROCESS_START)), process_start_time(pid)
        if recorded is not None and actual is not None and abs(recorded - actual) > START_TIME_TOLERANCE_S:
            return f"pid {pid} on {host} now belongs to another process (started {_datetime(int(actual * 1000))})"
        return None
    last = _int(tags.get(TAG_HEARTBEAT)) or start_ms
    if last is None:
        return None
    silence_s = (now_ms - last) / 1000
    if silence_s <= max_silence_s:
        return None
    return (
        f"no heartbeat from {host} for {silence_s:.0f} s (over {max_silence_s:.0f} s; a heuristic: "
        "its process cannot be checked from this machine)"
    )


class _Here:
    """This process's machine identity, read once per :func:`stale_runs` call."""

    def __init__(self):
        self.host = socket.gethostname()
        self.boot_id = _boot_id()
        self.pid_namespace = _pid_namespace()


def _experiments(client, name: str | None) -> dict[str, str]:
    """{experiment id: name}, of one experiment or all active ones."""
    if name is not None:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise ScenarioError(f"tracking.experiment: no experiment named {name!r} in this store; check the name")
        return {experiment.experiment_id: experiment.name}
    out, token = {}, None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        out.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            return out


def _running_runs(client, experiment_ids: list[str]):
    for start in range(0, len(experiment_ids), 100):
        token = None
        while True:
            page = client.search_runs(
                experiment_ids[start : start + 100],
                filter_string="attributes.status = 'RUNNING'",
                max_results=1000,
                page_token=token,
            )
            yield from page
            token = page.token
            if not token:
                break


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts as dead)."""
    if pid <= 0:
        return False
    if _proc_available():
        try:
            return _proc_stat(pid)[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    if os.name == "nt":
        return True  # os.kill would terminate it there; without psutil, assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started, in Unix seconds; None where the platform does not say.

    Linux: from ``/proc`` (boot time + the start tick in ``/proc/<pid>/stat``), with no
    dependency. Elsewhere: psutil when it is installed (it usually is, through accelerate).
    """
    if _proc_available():
        try:
            ticks = int(_proc_stat(pid)[19])
            return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - ImportError, psutil.Error
        return None


def _proc_available() -> bool:
    return os.path.exists("/proc/self/stat")


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name, starting at the state (field 3);
    the name is skipped by its closing parenthesis because it may hold spaces."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _datetime(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
