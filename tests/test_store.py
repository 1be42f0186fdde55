"""The tracking store: concurrent first runs on a new SQLite store, checks before a run,
and RUNNING runs whose process died."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedsec_bench import liveness, store
from fedsec_bench.errors import ScenarioError

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# The child processes import fedsec_bench.store without the package's __init__, which pulls in
# torch and transformers (seconds per process, tens of seconds for three on a small CI machine).
LIGHT_IMPORT = textwrap.dedent(
    f"""
    import sys, types
    package = types.ModuleType("fedsec_bench")
    package.__path__ = [{str(ROOT / "fedsec_bench")!r}]
    sys.modules["fedsec_bench"] = package
    """
)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An initialised SQLite store, copied by the tests that do not test initialisation
    (creating one runs every MLflow migration: seconds)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    store.prepare_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def db(template, tmp_path) -> str:
    path = tmp_path / "mlflow.db"
    shutil.copy(template, path)
    return f"sqlite:///{path}"


# ------------------------------------------------------------------ concurrent first runs

STARTER = LIGHT_IMPORT + textwrap.dedent(
    """
    import json, os, sys, time
    from mlflow.tracking import MlflowClient
    import mlflow.store.tracking.sqlalchemy_store  # imported before the start line, so all start at once
    from fedsec_bench import liveness, store

    uri, go = sys.argv[1], sys.argv[2]
    if os.environ.get("FEDSEC_TEST_UNLOCKED"):  # shows the race: FEDSEC_TEST_UNLOCKED=1 pytest ...
        from contextlib import contextmanager
        store.store_lock = contextmanager(lambda uri: (yield))
    open(f"{go}.{os.getpid()}.ready", "w").close()
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        store.prepare_store(uri)
        client = MlflowClient(tracking_uri=uri)
        experiment_id = store.get_or_create_experiment(client, "fedsec", uri)
        run = client.create_run(experiment_id, tags=liveness.run_process_tags())
        client.log_metric(run.info.run_id, "loss", 1.0, step=0)
        client.set_terminated(run.info.run_id, "FINISHED")
        print(json.dumps({"run_id": run.info.run_id}))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:200]}"}))
    """
)


def test_concurrent_first_runs_on_a_new_sqlite_store_all_land(tmp_path):
    """Three runs start at once on a store that does not exist yet (the folder neither):
    without the lock, the losers die creating tables or migrating (``table experiments
    already exists``, ``duplicate column name``)."""
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", STARTER, uri, str(go)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=_env())
        for _ in range(3)
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.*.ready"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)  # all imported: the race is in the store's creation, not in the imports
    go.touch()
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert [r.get("error") for r in results] == [None] * 3
    client = MlflowClient(tracking_uri=uri)
    experiments = [e for e in client.search_experiments() if e.name == "fedsec"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(r["run_id"] for r in results)
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_an_experiment_created_meanwhile_is_read_back(db, monkeypatch):
    """Where no lock is held (an MLflow server), "look up, else create" loses to a process
    that created the experiment in between: the loser reads the winner's back."""
    client = MlflowClient(tracking_uri=db)
    winner = client.create_experiment("raced")
    lookups = iter([None])
    real = client.get_experiment_by_name
    monkeypatch.setattr(client, "get_experiment_by_name", lambda name: next(lookups, None) or real(name))
    monkeypatch.setattr(store, "lock_path", lambda uri: None)
    assert store.get_or_create_experiment(client, "raced", db) == winner


def test_lock_sits_beside_the_database(tmp_path):
    assert store.lock_path(f"sqlite:///{tmp_path}/a/m.db") == tmp_path / "a" / "m.db.lock"
    assert store.lock_path("sqlite:///:memory:") is None
    assert store.lock_path("http://localhost:5000") is None
    assert store.lock_path(str(tmp_path / "mlruns")) == tmp_path / "mlruns.lock"


def test_prepare_store_names_an_old_or_a_newer_schema(db):
    path = db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")  # MLflow 1.x's first
    with pytest.raises(ScenarioError, match=r"^tracking\.uri: .*older MLflow.*mlflow db upgrade"):
        store.prepare_store(db)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    with pytest.raises(ScenarioError, match=r"^tracking\.uri: .*newer MLflow \(schema ffffffffffff\)"):
        store.prepare_store(db)


def test_a_deleted_experiment_is_a_scenario_error(db):
    client = MlflowClient(tracking_uri=db)
    client.delete_experiment(store.get_or_create_experiment(client, "gone", db))
    with pytest.raises(ScenarioError, match=r"^tracking\.experiment: experiment 'gone' was deleted.*restore"):
        store.get_or_create_experiment(client, "gone", db)


# ------------------------------------------------------------------ checks before a run


def test_reachable_stores_pass_and_nothing_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store.check_store(f"sqlite:///{tmp_path}/not/yet/mlflow.db")
    store.check_store(str(tmp_path / "mlruns"))
    store.check_store((tmp_path / "mlruns").as_uri())
    store.check_store("sqlite:///:memory:")
    store.check_output_dir(str(tmp_path / "runs" / "deeper"))
    assert list(tmp_path.iterdir()) == []


def test_a_folder_store_mlflow_refuses_is_named(tmp_path, monkeypatch):
    environment = pytest.importorskip("mlflow.environment_variables")
    if not hasattr(environment, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip("this MLflow opens folder stores")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ScenarioError, match=r"^tracking\.uri: mlflow .* no longer opens folder stores.*sqlite:///"):
        store.check_store(str(tmp_path / "mlruns"))


def test_an_existing_mlflow_database_passes(db):
    store.check_store(db)


@pytest.mark.parametrize(
    "uri, message",
    [
        ("sqlite:///{file}/mlflow.db", r"the database's folder: .*plain\.txt is a file, not a folder"),
        ("sqlite:///{file}", r"plain\.txt is not a SQLite database"),
        ("sqlite:///{tmp}", r"exists but is not a file"),
        ("{file}/mlruns", r"plain\.txt is a file, not a folder"),  # with MLFLOW_ALLOW_FILE_STORE
        ("ftp://example.org/x", r"unknown scheme 'ftp'; use one of .*http:.*sqlite:"),
    ],
)
def test_unusable_stores_are_named(tmp_path, monkeypatch, uri, message):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "plain.txt").write_text("not a database\n")
    uri = uri.format(file=tmp_path / "plain.txt", tmp=tmp_path)
    with pytest.raises(ScenarioError, match=r"^tracking\.uri: .*" + message):
        store.check_store(uri)


@pytest.mark.skipif(not LINUX, reason="/proc takes no new files, even from root")
def test_an_unwritable_folder_is_named_even_for_root():
    with pytest.raises(ScenarioError, match=r"^tracking\.uri: the database's folder: /proc/fedsec .*not writable"):
        store.check_store("sqlite:////proc/fedsec/mlflow.db")
    with pytest.raises(ScenarioError, match=r"^tracking\.output_dir: /proc/fedsec-runs .*not writable"):
        store.check_output_dir("/proc/fedsec-runs")


def _unprivileged(check, *args) -> str:
    """The ScenarioError message of ``check(*args)`` run by a user who is not root (root
    writes to read-only folders): in a forked child that drops to nobody when we are root."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            check(*args)
            message = "no error"
        except ScenarioError as exc:
            message = str(exc)
        except BaseException as exc:  # noqa: BLE001
            message = f"{type(exc).__name__}: {exc}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(child, 0)
    return message


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_read_only_folder_is_named():
    top = Path(tempfile.mkdtemp())  # not under pytest's own folder, which only its owner may enter
    top.chmod(0o755)
    folder = top / "ro"
    folder.mkdir(mode=0o555)
    store.sqlite_path("sqlite:///x.db")  # imports SQLAlchemy before the fork
    try:
        assert re.match(r"tracking\.output_dir: .*/ro is not writable \(Permission denied\)",
                        _unprivileged(store.check_output_dir, str(folder)))
        assert re.match(r"tracking\.output_dir: .*/ro/a/b cannot be created: .*/ro is not writable",
                        _unprivileged(store.check_output_dir, str(folder / "a" / "b")))
        assert re.match(r"tracking\.uri: the database's folder: .*/ro is not writable",
                        _unprivileged(store.check_store, f"sqlite:///{folder}/mlflow.db"))
        top.chmod(0o700)
        assert re.match(r"tracking\.output_dir: .*/ro cannot be reached \(permission denied",
                        _unprivileged(store.check_output_dir, str(folder)))
    finally:
        folder.chmod(0o755)
        shutil.rmtree(top)


def test_an_output_dir_under_a_file_is_named(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(ScenarioError, match=r"^tracking\.output_dir: .*plain\.txt is a file, not a folder"):
        store.check_output_dir(str(tmp_path / "plain.txt" / "runs"))
    with pytest.raises(ScenarioError, match=r"^tracking\.output_dir: .*plain\.txt is a file, not a folder"):
        store.check_output_dir(str(tmp_path / "plain.txt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_fails_at_once():
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(ScenarioError, match=rf"^tracking\.uri: no MLflow server answers at http://127.0.0.1:{port}"):
        store.check_store(f"http://127.0.0.1:{port}")
    unreachable = rf"^tracking\.uri: cannot reach the postgresql database at 127\.0\.0\.1:{port}"
    with pytest.raises(ScenarioError, match=unreachable):
        store.check_store(f"postgresql://user:pw@127.0.0.1:{port}/mlflow")
    with pytest.raises(ScenarioError) as error:
        store.check_store(f"http://me:secret@127.0.0.1:{port}")
    assert "secret" not in str(error.value) and f"me:***@127.0.0.1:{port}" in str(error.value)
    assert time.monotonic() - start < 2


def test_a_silent_server_times_out_in_seconds():
    with socket.socket() as listener:  # accepts connections (the kernel does) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        start = time.monotonic()
        with pytest.raises(ScenarioError, match=r"no MLflow server answers .*timed out"):
            store.check_store(f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert time.monotonic() - start < store.HTTP_CHECK_TIMEOUT_S + 2


@pytest.fixture
def server():
    """A local HTTP server answering /health with the status in ``server.status``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status = self.server.status if self.path == "/health" else 404
            self.server.seen.append(self.headers.get("Authorization"))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    httpd.status, httpd.seen = 200, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.uri = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_http_store_health(server, monkeypatch):
    store.check_store(server.uri)
    store.check_store(server.uri + "/")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret")
    server.status = 401
    with pytest.raises(ScenarioError, match=r"refused the credentials \(HTTP 401\); set MLFLOW_TRACKING_TOKEN"):
        store.check_store(server.uri)
    assert server.seen[-1] == "Bearer secret"
    with pytest.raises(ScenarioError, match=r"no MLflow server answers .*/nope/health answered HTTP 404"):
        store.check_store(server.uri + "/nope")


# ------------------------------------------------------------------ stale runs

VICTIM = LIGHT_IMPORT + textwrap.dedent(
    """
    import sys, time
    from mlflow.tracking import MlflowClient
    from fedsec_bench import liveness, store

    uri = sys.argv[1]
    client = MlflowClient(tracking_uri=uri)
    experiment_id = store.get_or_create_experiment(client, "fedsec", uri)
    run = client.create_run(experiment_id, tags=liveness.run_process_tags() | {"fedsec.scenario": "victim"})
    client.set_tag(run.info.run_id, *liveness.heartbeat_tag().popitem())
    print(run.info.run_id, flush=True)
    time.sleep(600)
    """
)


def test_a_run_whose_process_was_killed_is_found_and_marked(db):
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, db], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=_env())
    try:
        run_id = victim.stdout.readline().strip()
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    client = MlflowClient(tracking_uri=db)
    live = client.create_run(store.get_or_create_experiment(client, "fedsec", db), tags=liveness.run_process_tags())

    found = liveness.stale_runs(db, "fedsec")
    assert [s.run_id for s in found] == [run_id]
    stale = found[0]
    assert (stale.experiment, stale.scenario, stale.pid) == ("fedsec", "victim", victim.pid)
    assert stale.host == socket.gethostname()
    assert stale.reason == f"process {victim.pid} on {socket.gethostname()} is gone"
    assert stale.start_time is not None and stale.last_heartbeat >= stale.start_time
    assert stale.started == stale.start_time.strftime("%Y-%m-%d %H:%M UTC")

    liveness.mark_stale(db, [run_id], reasons={run_id: stale.reason})
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["fedsec.stale"] == "true"
    assert run.data.tags["fedsec.stale_reason"] == stale.reason
    assert run.info.end_time == int(run.data.tags["fedsec.heartbeat"])
    assert liveness.stale_runs(db) == []
    liveness.mark_stale(db, [live.info.run_id])  # not stale, but asked for: it is marked...
    assert client.get_run(live.info.run_id).info.status == "KILLED"
    liveness.mark_stale(db, [run_id])  # ...and a run no longer RUNNING is left as it is
    assert client.get_run(run_id).info.end_time == int(run.data.tags["fedsec.heartbeat"])


def test_what_each_rule_decides(db):
    client = MlflowClient(tracking_uri=db)
    experiment_id = store.get_or_create_experiment(client, "rules", db)
    mine = liveness.run_process_tags()
    hour_ago = str(int((time.time() - 3600) * 1000))

    def run(tags):
        return client.create_run(experiment_id, tags=tags).info.run_id

    alive = run(mine)
    reused = run(mine | {"fedsec.process_start": "1.00"}) if "fedsec.process_start" in mine else None
    rebooted = run(mine | {"fedsec.boot_id": "another-boot"}) if "fedsec.boot_id" in mine else None
    far_silent = run({"fedsec.host": "elsewhere", "fedsec.pid": "1", "fedsec.heartbeat": hour_ago})
    far_alive = run({"fedsec.host": "elsewhere", "fedsec.pid": "1"} | liveness.heartbeat_tag())
    container = run(mine | {"fedsec.pid": "999999999", "fedsec.pid_namespace": "pid:[1]"} | liveness.heartbeat_tag())
    untagged = run({})
    finished = run({"fedsec.host": "elsewhere", "fedsec.pid": "1", "fedsec.heartbeat": "0"})
    client.set_terminated(finished, "FINISHED")

    reasons = {s.run_id: s.reason for s in liveness.stale_runs(db, "rules", max_silence_s=600)}
    expected = {far_silent} | {r for r in (reused, rebooted) if r}
    assert set(reasons) == expected
    assert {alive, far_alive, container, untagged, finished}.isdisjoint(reasons)
    assert reasons[far_silent].startswith("no heartbeat from elsewhere for 3600 s (over 600 s; a heuristic")
    if reused:
        assert "now belongs to another process" in reasons[reused]
    if rebooted:
        assert "rebooted since the run started" in reasons[rebooted]
    assert far_silent not in {s.run_id for s in liveness.stale_runs(db, "rules", max_silence_s=7200)}
    with_unknown = {s.run_id: s.reason for s in liveness.stale_runs(db, "rules", include_unknown=True)}
    assert with_unknown[untagged].startswith("no fedsec.host/fedsec.pid tags")
    with pytest.raises(ScenarioError, match=r"^tracking\.experiment: no experiment named 'nope'"):
        liveness.stale_runs(db, "nope")


def test_process_identity():
    tags = liveness.run_process_tags()
    assert tags["fedsec.host"] == socket.gethostname()
    assert tags["fedsec.pid"] == str(os.getpid())
    assert abs(int(tags["fedsec.heartbeat"]) - time.time() * 1000) < 5000
    assert liveness.pid_alive(os.getpid())
    if LINUX:
        assert abs(float(tags["fedsec.process_start"]) - liveness.process_start_time(os.getpid())) < 0.05
        assert time.time() - 86400 * 365 < float(tags["fedsec.process_start"]) <= time.time()
        assert tags["fedsec.boot_id"] and tags["fedsec.pid_namespace"].startswith("pid:[")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not liveness.pid_alive(child.pid)
    assert not liveness.pid_alive(0) and not liveness.pid_alive(-5)
