"""Real servers for integration tests: an authenticated MLflow tracking server and PostgreSQL.

Everything started here runs in its own process group and is ended by that group's id on
exit, also when the test body fails.

    from tests.servers import mlflow_server

    def test_x(tmp_path, monkeypatch):
        with mlflow_server(tmp_path) as srv:            # or backend="postgres"
            for k, v in srv.env.items():
                monkeypatch.setenv(k, v)
            client = mlflow.MlflowClient()              # authenticates from the env
            ...

Subprocesses get the same with ``env={**os.environ, **srv.env}``.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO_ROOT / "mlflow" / "start-server.sh"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n_chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError as e:
        return f"(cannot read {path}: {e})"


def _end_group(proc: subprocess.Popen[bytes], first_signal: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
    """Signal the process group led by ``proc``; SIGKILL it if it has not ended in ``grace_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, first_signal)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Also when the leader is gone: children it left behind are still in its group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class _PgBin:
    initdb: Path
    postgres: Path
    createdb: Path


def _find_pg_binaries() -> _PgBin:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for d in reversed(candidates):
        b = _PgBin(Path(d, "initdb"), Path(d, "postgres"), Path(d, "createdb"))
        if all(p.exists() for p in (b.initdb, b.postgres, b.createdb)):
            return b
    raise RuntimeError(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
        "install them with `apt-get update && apt-get install -y postgresql` "
        "(the Python driver is `pip install psycopg2-binary`)."
    )


def _pg_user() -> pwd.struct_passwd | None:
    """The account the server runs as: 'postgres' when we are root (it refuses root), else us."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root and there is no 'postgres' user to run PostgreSQL as: "
            "`apt-get install -y postgresql` creates it (or run the tests as a non-root user)."
        ) from None


def _dsn_without_password(dsn: str) -> tuple[str, str | None]:
    """Split ``postgresql://user:pw@host:port/db`` into (URI without password, password)."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn, None
    netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), parts.password


@contextmanager
def postgres_server(tmp_path: Path, *, databases: tuple[str, ...] = (), timeout_s: float = 60.0) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 and a free port; yields its DSN.

    The DSN is ``postgresql://genpipe:<password>@127.0.0.1:<port>/genpipe`` (the role is a
    superuser with a random password; password authentication over TCP, no remote access).
    ``databases`` are created as well, owned by the same role. The data directory lives in a
    fresh temp dir readable by the server's account (pytest's ``tmp_path`` is private to
    root); the server log is copied to ``tmp_path/postgres.log`` on exit.
    """
    pg = _find_pg_binaries()
    user = _pg_user()
    password = secrets.token_urlsafe(24)
    port = free_port()
    base = Path(tempfile.mkdtemp(prefix="genpipe-pg-"))  # short: the unix socket lives here
    data, log_path, pwfile = base / "data", base / "postgres.log", base / "pwfile"
    pwfile.write_text(password + "\n")
    run_as: dict[str, object] = {}
    if user is not None:
        for p in (base, pwfile):
            os.chown(p, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    base.chmod(0o700)
    pwfile.chmod(0o600)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    if user is not None:
        env["HOME"] = str(base)

    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [str(pg.initdb), "-D", str(data), "-U", "genpipe", f"--pwfile={pwfile}", "-E", "UTF8",
             "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "--no-sync"],
            env=env, cwd=base, check=True, capture_output=True, **run_as,  # type: ignore[arg-type]
        )  # fmt: skip
        pwfile.unlink()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(pg.postgres), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={base}", "-c", "fsync=off", "-c", "full_page_writes=off"],
                env=env, cwd=base, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, **run_as,  # type: ignore[arg-type]
            )  # fmt: skip
        client_env = {**env, "PGPASSWORD": password}
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"postgres exited with code {proc.returncode}:\n{_tail(log_path)}")
            ok = subprocess.run(
                [str(pg.createdb.with_name("pg_isready")), "-q", "-h", "127.0.0.1", "-p", str(port)],
                env=client_env, capture_output=True,
            )  # fmt: skip
            if ok.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.2)
        for db in ("genpipe", *databases):
            subprocess.run(
                [str(pg.createdb), "-h", "127.0.0.1", "-p", str(port), "-U", "genpipe", db],
                env=client_env, check=True, capture_output=True,
            )  # fmt: skip
        yield f"postgresql://genpipe:{password}@127.0.0.1:{port}/genpipe"
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"{Path(e.cmd[0]).name} failed ({e.returncode}): {(e.stderr or b'').decode(errors='replace')}\n"
            f"{_tail(log_path)}"
        ) from e
    finally:
        if proc is not None:
            _end_group(proc, signal.SIGINT)  # SIGINT = PostgreSQL's "fast" shutdown
        try:
            tmp_path.mkdir(parents=True, exist_ok=True)
            if log_path.exists():
                shutil.copyfile(log_path, tmp_path / "postgres.log")
        except OSError:
            pass
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- S3 (moto in server mode)


@dataclass(frozen=True)
class S3Info:
    """A running S3-compatible server (moto's server mode) with one bucket."""

    endpoint: str
    bucket: str
    env: dict[str, str] = field(repr=False, default_factory=dict)
    """MLFLOW_S3_ENDPOINT_URL and the AWS credentials, for boto3 clients (the MLflow server)."""

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix`."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        keys, token = [], None
        while True:
            page = s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix, **({"ContinuationToken": token} if token
                                                                               else {}))
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]


@contextmanager
def s3_server(tmp_path: Path, bucket: str = "artifacts", timeout_s: float = 60.0) -> Iterator[S3Info]:
    """moto's S3-compatible server on a free loopback port, with `bucket` created."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "s3-server.log"
    env = {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "genpipe-test",
           "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24), "AWS_DEFAULT_REGION": "us-east-1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(endpoint, timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto_server did not answer within {timeout_s:.0f} s") from None
                time.sleep(0.3)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield S3Info(endpoint, bucket, env)
    finally:
        _end_group(proc)


# --------------------------------------------------------------------------- MLflow


@dataclass(frozen=True)
class ServerInfo:
    """A running MLflow tracking server and how to reach it."""

    uri: str
    """``http://127.0.0.1:PORT``, no credentials in it."""
    username: str
    password: str = field(repr=False)
    env: dict[str, str] = field(repr=False, default_factory=dict)
    """MLFLOW_TRACKING_URI / _USERNAME / _PASSWORD for clients."""
    home: Path = Path()
    """The server's MLFLOW_HOME (stores, auth config, artifacts unless elsewhere)."""
    log_path: Path = Path()
    backend_store_uri: str = ""
    """Store URI the server was given (never with a password)."""
    s3: S3Info | None = None
    """The S3-compatible store holding the server's artifacts, when ``artifacts="s3"``."""

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the server's combined stdout/stderr."""
        return _tail(self.log_path, n_chars)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {proc.returncode} before answering {url}:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server did not answer {url} within {timeout_s:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.5)


@contextmanager
def mlflow_server(
    tmp_path: Path,
    backend: Literal["sqlite", "postgres"] = "sqlite",
    *,
    artifacts: Literal["local", "s3"] = "local",
    workers: int = 1,
    timeout_s: float = 180.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[ServerInfo]:
    """Run ``mlflow/start-server.sh`` with basic auth on a free loopback port.

    ``backend="sqlite"`` keeps the tracking/registry store and the users database in SQLite
    files under ``tmp_path/mlflow-home``; ``"postgres"`` starts :func:`postgres_server` and
    puts both there (databases ``mlflow`` and ``mlflow_auth``; the DB password reaches the
    server through ``PGPASSWORD``, never the URI). Artifacts are proxied by the server into
    ``tmp_path/mlflow-home/artifacts``, or with ``artifacts="s3"`` into a bucket of :func:`s3_server`
    (credentials reach the server through the usual AWS variables). The admin password is random per server.
    """
    if backend not in ("sqlite", "postgres"):
        raise ValueError(f"backend must be 'sqlite' or 'postgres', got {backend!r}")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        mlflow_bin = Path(shutil.which("mlflow") or "mlflow")
    home = tmp_path / "mlflow-home"
    home.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / "mlflow-server.log"
    port = free_port()
    username, password = "admin", secrets.token_urlsafe(24)
    uri = f"http://127.0.0.1:{port}"

    with ExitStack() as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
        env.update(
            {
                "MLFLOW_HOME": str(home),
                "MLFLOW_HOST": "127.0.0.1",
                "MLFLOW_PORT": str(port),
                "MLFLOW_WORKERS": str(workers),
                "MLFLOW_BIN": str(mlflow_bin),
                "MLFLOW_AUTH_ADMIN_USERNAME": username,
                "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
                # Each uncached request costs a PBKDF2 check (~1 s on 2 busy cores).
                "MLFLOW_AUTH_CACHE_TTL_SECONDS": "300",
                # The GenAI job runner (online scoring, trace archival) is not under test
                # and competes for the CPU at startup.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            }
        )
        backend_uri = f"sqlite:///{home}/mlflow.db"
        if backend == "postgres":
            dsn = stack.enter_context(postgres_server(tmp_path, databases=("mlflow", "mlflow_auth")))
            base_uri, db_password = _dsn_without_password(dsn)
            backend_uri = base_uri.rsplit("/", 1)[0] + "/mlflow"
            env["MLFLOW_BACKEND_STORE_URI"] = backend_uri
            env["MLFLOW_AUTH_DATABASE_URI"] = base_uri.rsplit("/", 1)[0] + "/mlflow_auth"
            env["PGPASSWORD"] = db_password or ""
        s3 = None
        if artifacts == "s3":
            s3 = stack.enter_context(s3_server(tmp_path))
            env.update(s3.env, MLFLOW_ARTIFACTS_DESTINATION=f"s3://{s3.bucket}/mlflow")
        env.update(extra_env or {})

        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["bash", str(START_SCRIPT)], env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        stack.callback(_end_group, proc)
        _wait_healthy(proc, f"{uri}/health", log_path, timeout_s)
        yield ServerInfo(
            uri=uri,
            username=username,
            password=password,
            env={
                "MLFLOW_TRACKING_URI": uri,
                "MLFLOW_TRACKING_USERNAME": username,
                "MLFLOW_TRACKING_PASSWORD": password,
            },
            home=home,
            log_path=log_path,
            backend_store_uri=backend_uri,
            s3=s3,
        )
