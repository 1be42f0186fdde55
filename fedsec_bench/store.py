"""The MLflow tracking store: open it safely and check it before a run.

Two problems live here, both about the store rather than about one run (runs whose process
died are found by :mod:`fedsec_bench.stale_runs`):

* **Creating a new SQLite store is racy.** MLflow's ``SqlAlchemyStore`` builds a fresh
  database by checking "do all tables exist?" and then creating them and running every
  Alembic migration, with nothing held between the check and the work. Two ``fedsec run``
  started at once on a new ``sqlite:///mlflow.db`` both see an empty database, both run
  ``CREATE TABLE`` / ``ALTER TABLE`` and the loser dies with ``table experiments already
  exists`` or ``duplicate column name`` (or, a step later, an IntegrityError creating the
  default experiment, or RESOURCE_ALREADY_EXISTS creating ours). :func:`prepare_store` and
  :func:`get_or_create_experiment` do that first contact under a file lock.
* **An unreachable store is found late and slowly.** MLflow's HTTP client retries a dead
  server for minutes, and a SQLite file in a missing or read-only folder fails only at the
  first write, after the run was set up. :func:`check_store` and :func:`check_output_dir`
  answer in seconds with a :class:`~fedsec_bench.errors.ScenarioError`.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ScenarioError, excerpt

LOCK_TIMEOUT_S = 120.0
"""How long a process waits for another one to finish initialising the store. Creating and
migrating a new SQLite store takes a few seconds; two minutes means something is stuck."""

HTTP_CHECK_TIMEOUT_S = 3.0
DB_CHECK_TIMEOUT_S = 3.0
SQL_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql"}
HTTP_SCHEMES = {"http", "https"}
DB_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
UNCHECKED_SCHEMES = {"databricks", "databricks-uc", "uc"}
"""Accepted as MLflow understands them, but not probed: they need workspace credentials."""

# --------------------------------------------------------------------------- opening the store


def prepare_store(uri: str) -> None:
    """Create (or open) the tracking store at ``uri`` so that concurrent runs cannot race it.

    Call it once per process before the first ``MlflowClient(uri)`` call that touches the
    store (``Tracker`` start, ``fedsec runs``). It opens the store under :func:`store_lock`,
    which makes MLflow create the tables, run the migrations and insert the default
    experiment while no other process can, and caches the store for the rest of the process.
    Later processes find a complete store and skip all of that.

    A store whose schema is older than the installed MLflow is *not* migrated here: MLflow
    does not migrate those on its own either, because migrations are not transactional and
    want a backup first; the error says to run ``mlflow db upgrade``.

    Nothing to do for HTTP (and plugin) stores: the server created its database when it
    started and serialises the writes; the name clash of two ``create_experiment`` calls is
    handled by :func:`get_or_create_experiment`. Other SQL databases (PostgreSQL, MySQL) race
    like SQLite on first use, but can only be locked per machine (see :func:`store_lock`).
    """
    from mlflow.tracking import MlflowClient

    if lock_path(uri) is None and _scheme(uri) != "sqlite":
        return
    with store_lock(uri):
        if _scheme(uri) == "sqlite":
            path = sqlite_path(uri)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure to open the store is the user's to fix
            raise _open_error(uri, exc) from exc


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """The id of the active experiment ``name``, created if missing.

    "Look it up, create it if absent" races like table creation: both processes find no
    experiment, one create succeeds and the other raises RESOURCE_ALREADY_EXISTS. Under the
    store lock (SQLite and file stores) the race cannot happen; elsewhere the loser reads
    back the winner's experiment.
    """
    from mlflow.exceptions import MlflowException

    with store_lock(uri):
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name)
            except MlflowException as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise ScenarioError(
                f"tracking.experiment: experiment {name!r} was deleted in {_shown(uri)}; restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or pick another name"
            )
        return experiment.experiment_id


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock for the store at ``uri`` (a no-op for server-backed stores).

    SQLite: ``<database>.lock`` beside the database. File stores: ``<folder>.lock`` beside the
    folder. Other SQL databases: a lock file in the temp folder named after the URI, which
    only serialises processes on this machine (as MLflow's own job store does). The lock is
    an OS file lock (flock): it is released when its process dies, so a crash never leaves
    the store locked; a leftover ``.lock`` file is harmless.
    """
    path = lock_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(path), timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise ScenarioError(
            f"tracking.uri: another process has held {path} for over {LOCK_TIMEOUT_S:.0f} s while "
            "initialising the tracking store; wait for it to finish or stop it"
        ) from None


def lock_path(uri: str) -> Path | None:
    """Where :func:`store_lock` locks for ``uri``; None when no lock is needed."""
    scheme = _scheme(uri)
    if scheme == "sqlite":
        path = sqlite_path(uri)
        return None if path is None else path.with_name(path.name + ".lock")
    if scheme in SQL_SCHEMES:
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"fedsec-store-{digest}.lock"
    if scheme == "file":
        folder = _file_path(uri).resolve()
        return folder.with_name(folder.name + ".lock")
    return None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (relative to the working directory, as in
    SQLAlchemy); None for an in-memory database. Raises ScenarioError for a malformed URI."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(uri).database
    except (ArgumentError, ValueError) as exc:
        raise ScenarioError(
            f"tracking.uri: {_shown(uri)} is not a valid SQLite URI ({_excerpt(str(exc))}); "
            "write it as sqlite:///relative/path.db or sqlite:////absolute/path.db"
        ) from None
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    if database.startswith("file:"):  # sqlite:///file:path?uri=true
        database = urllib.parse.urlparse(database).path
    return Path(database)


# --------------------------------------------------------------------------- checking before a run


def check_store(uri: str) -> None:
    """Raise ScenarioError when the tracking store at ``uri`` cannot be used; returns in seconds.

    * ``sqlite:`` - the database's folder must exist and be writable, or be creatable (SQLite
      writes its journal beside the database); an existing database must be a writable
      SQLite file.
    * ``file:`` URIs and plain paths - the folder must be writable or creatable, and the
      installed MLflow must still open folder stores (3.x wants ``MLFLOW_ALLOW_FILE_STORE``).
    * ``http(s):`` - one ``GET <uri>/health`` with a 3 s timeout, no retries, sending the
      credentials MLflow would send (``MLFLOW_TRACKING_TOKEN`` or ``MLFLOW_TRACKING_USERNAME``
      / ``MLFLOW_TRACKING_PASSWORD``; ``MLFLOW_TRACKING_INSECURE_TLS``,
      ``MLFLOW_TRACKING_SERVER_CERT_PATH``).
    * ``postgresql:``, ``mysql:``, ``mssql:`` - a TCP connection to the database's host and
      port with a 3 s timeout (credentials are MLflow's to check).

    Nothing here changes MLflow's own HTTP retries. After this check has passed, a server
    that goes away *during* a run is better retried than abandoned, so MLflow's defaults
    stay (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 7 with ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``
    2: about four minutes; ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 120 s per request). Whoever
    prefers failing fast mid-run can export ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=10``.
    """
    scheme = _scheme(uri)
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme == "file":
        _check_file_store_allowed(uri)
        problem = _folder_problem(_file_path(uri))
        if problem:
            raise ScenarioError(f"tracking.uri: {problem}; choose a writable folder or fix its permissions")
    elif scheme in HTTP_SCHEMES:
        _check_http(uri)
    elif scheme in SQL_SCHEMES:
        _check_database_server(uri, scheme)
    elif scheme in UNCHECKED_SCHEMES or scheme in _plugin_schemes():
        return
    else:
        supported = sorted(SQL_SCHEMES | HTTP_SCHEMES | UNCHECKED_SCHEMES | {"file"} | _plugin_schemes())
        raise ScenarioError(
            f"tracking.uri: {_shown(uri)} has an unknown scheme {scheme!r}; use one of "
            f"{', '.join(s + ':' for s in supported)} or a plain folder path (e.g. sqlite:///mlflow.db)"
        )


def check_output_dir(path: str) -> None:
    """Raise ScenarioError when the run folder root ``path`` cannot be created or written.

    Nothing is created: the nearest existing folder on the way must take a new file (a probe
    file is written and removed, because permission bits lie for root and on network mounts).
    """
    problem = _folder_problem(Path(path))
    if problem:
        raise ScenarioError(f"tracking.output_dir: {problem}; choose a writable folder or fix its permissions")


def _check_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    if path is None:
        return
    problem = _folder_problem(path.parent)
    if problem:
        raise ScenarioError(f"tracking.uri: the database's folder: {problem}; choose a writable folder for it")
    if not _exists(path):
        return
    if not path.is_file():
        raise ScenarioError(f"tracking.uri: {path} exists but is not a file; point the URI at a database file")
    try:
        with open(path, "r+b") as handle:
            header = handle.read(16)
    except OSError as exc:
        raise ScenarioError(
            f"tracking.uri: cannot open {path} for writing ({exc.strerror}); fix its permissions or use another file"
        ) from None
    if header and header != b"SQLite format 3\x00":
        raise ScenarioError(
            f"tracking.uri: {path} is not a SQLite database; point the URI at a new or an MLflow database file"
        )


def _check_file_store_allowed(uri: str) -> None:
    """Recent MLflow (3.x) refuses folder stores unless ``MLFLOW_ALLOW_FILE_STORE=true``."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # older MLflow: folder stores just work
        return
    if not MLFLOW_ALLOW_FILE_STORE.get():
        raise ScenarioError(
            f"tracking.uri: mlflow {_mlflow_version()} no longer opens folder stores such as {_shown(uri)}; "
            "use a database (sqlite:///mlflow.db; `mlflow migrate-filestore` moves old runs over), "
            "or set MLFLOW_ALLOW_FILE_STORE=true"
        )


def _check_http(uri: str) -> None:
    import http.client

    url = uri.rstrip("/") + "/health"
    shown = _shown(url)
    try:
        request = urllib.request.Request(url, headers=_auth_headers())
        with urllib.request.urlopen(request, timeout=HTTP_CHECK_TIMEOUT_S, context=_ssl_context(uri)) as response:
            response.read(64)
        return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ScenarioError(
                f"tracking.uri: the MLflow server at {_shown(uri)} refused the credentials (HTTP {exc.code}); set "
                "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        why = f"GET {shown} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        why = f"GET {shown} failed: {_excerpt(str(reason) or type(reason).__name__)}"
    except http.client.HTTPException as exc:  # a reply that is not HTTP
        why = f"GET {shown} failed: {type(exc).__name__}"
    raise ScenarioError(
        f"tracking.uri: no MLflow server answers at {_shown(uri)} ({why}); start one "
        "(mlflow server --backend-store-uri sqlite:///mlflow.db) or fix the address"
    )


def _check_database_server(uri: str, scheme: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except (ArgumentError, ValueError) as exc:
        raise ScenarioError(f"tracking.uri: {_shown(uri)} is not a valid database URI ({_excerpt(str(exc))})") from None
    if not url.host:
        return  # a local socket or a driver-specific address: MLflow will tell
    port = url.port or DB_DEFAULT_PORTS[scheme]
    try:
        socket.create_connection((url.host, port), timeout=DB_CHECK_TIMEOUT_S).close()
    except OSError as exc:
        raise ScenarioError(
            f"tracking.uri: cannot reach the {scheme} database at {url.host}:{port} "
            f"({_excerpt(exc.strerror or str(exc) or type(exc).__name__)}); start it or fix the address"
        ) from None


def _folder_problem(folder: Path) -> str | None:
    """None when ``folder`` exists and takes a new file, or could be created; else what is wrong."""
    probe = folder
    while probe.parent != probe:
        try:
            probe.stat()
            break
        except PermissionError:
            return f"{folder} cannot be reached (permission denied on a folder above it)"
        except OSError:  # missing, or under a file: look further up
            probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder" if probe.is_file() else f"{probe} is not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".fedsec-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        where = f"{folder}" if probe == folder else f"{folder} cannot be created: {probe}"
        return f"{where} is not writable ({exc.strerror or type(exc).__name__})"
    return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a parent without search permission
        return False


def _auth_headers() -> dict[str, str]:
    import base64

    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _ssl_context(uri: str):
    if not uri.startswith("https"):
        return None
    import ssl

    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it, as MLflow honours it
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)


def _plugin_schemes() -> set[str]:
    """Schemes third-party packages register for MLflow tracking stores."""
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="mlflow.tracking_store")}


def _scheme(uri: str) -> str:
    """The URI's scheme, "file" for plain paths (Windows drive letters included), and the
    dialect for SQLAlchemy URIs with a driver (``postgresql+psycopg2`` -> ``postgresql``)."""
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if len(scheme) <= 1:
        return "file"
    return scheme.split("+", 1)[0]


def _file_path(uri: str) -> Path:
    parsed = urllib.parse.urlparse(uri)
    if len(parsed.scheme) <= 1:
        return Path(uri)
    return Path(urllib.request.url2pathname(parsed.path))


def _open_error(uri: str, exc: Exception) -> ScenarioError:
    text, uri = str(exc), _shown(uri)
    if "out-of-date database schema" in text or "Can't locate revision" in text:
        found = re.search(r"found version (\w+)|revision identified by '(\w+)'", text)
        revision = found and (found.group(1) or found.group(2))
        if revision and not _known_revision(revision):
            return ScenarioError(
                f"tracking.uri: {uri} was written by a newer MLflow (schema {revision}) than the one installed "
                f"(mlflow {_mlflow_version()}); upgrade mlflow or use another database"
            )
        return ScenarioError(
            f"tracking.uri: {uri} was written by an older MLflow; back it up, then run "
            f"`mlflow db upgrade {uri}` (or use another database)"
        )
    return ScenarioError(
        f"tracking.uri: cannot open the tracking store {uri} ({type(exc).__name__}: {_excerpt(text)}); "
        "fix the store or point tracking.uri at a new one"
    )


def _known_revision(revision: str) -> bool:
    """Whether the installed MLflow's migrations know this schema revision (True when unsure)."""
    try:
        from alembic.script import ScriptDirectory
        from mlflow.store.db.utils import _get_alembic_config

        ScriptDirectory.from_config(_get_alembic_config(db_url="")).get_revision(revision)
    except ImportError:
        return True
    except Exception:  # noqa: BLE001 - alembic's ResolutionError and the like: unknown
        return False
    return True


def _mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")


def _shown(uri: str) -> str:
    """The URI as messages print it: bounded, and with any password replaced by ***."""
    try:
        parsed = urllib.parse.urlsplit(uri)
        if parsed.password:
            netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
            uri = urllib.parse.urlunsplit(parsed._replace(netloc=netloc))
    except ValueError:
        pass
    return _excerpt(uri)


def _excerpt(text: str, limit: int = 200) -> str:
    """The first line of a library's message, bounded."""
    return excerpt(text.strip().splitlines()[0] if text.strip() else "", limit)
