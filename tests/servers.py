"""Tracking servers for the tests, as teams run them: a PostgreSQL cluster of the test session's
own (Debian's package, a temp folder, a free loopback port) and `mlflow server` on it behind
MLflow's basic-auth app, with the artifacts the server serves (clients see mlflow-artifacts:/
URIs). Started and stopped like the model servers of steps/serving/processes.py; the embedded
default (a SQLite file, no server) needs none of this."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from steps.serving.processes import clean_env, free_port, running


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    @classmethod
    def random(cls, username: str) -> Credentials:
        return cls(username, secrets.token_urlsafe(16))

    def env(self) -> dict[str, str]:
        """As MLflow's client reads them."""
        return {
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }


@dataclass(frozen=True)
class Postgres:
    """A running cluster; `postgres` is its superuser, trusted on loopback."""

    port: int
    data: Path
    bin_dir: Path

    def create_database(self, name: str) -> None:
        self.psql(f'CREATE DATABASE "{name}"')

    def uri(self, database: str) -> str:
        """The database's SQLAlchemy URI (a bare postgresql:// means psycopg 3 to SQLAlchemy
        2.1; the tests install psycopg2)."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        command = [str(self.bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(self.port)]
        command += ["-U", "postgres", "-d", database, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    def dump(self, database: str) -> str:
        """The whole database as SQL text (what a search of the store reads)."""
        command = [str(self.bin_dir / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port)]
        command += ["-U", "postgres", database]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def postgres_bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError(
            "PostgreSQL is not installed: `apt-get install -y postgresql` (.ci/run does it)"
        )
    return Path(initdb).parent


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """initdb and pg_ctl in a temp folder. PostgreSQL refuses to run as root, so under root the
    cluster belongs to the `postgres` user (the folder lives outside pytest's, which only root
    can enter)."""
    bin_dir = postgres_bin_dir()
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="pg-cluster-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data, log = root / "data", root / "server.log"
    try:
        subprocess.run(
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
            check=True, capture_output=True,
        )  # fmt: skip
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log),
             "-w", "start"],
            check=True, capture_output=True,
        )  # fmt: skip
        try:
            yield Postgres(port, data, bin_dir)
        finally:
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
            )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class ServerSetup:
    """What a tracking server starts from: its port, its PostgreSQL databases (the store, and
    basic-auth's users and permissions beside it), its artifacts and its admin. Starting it again
    from the same setup is a restart."""

    root: Path
    port: int
    cluster: Postgres
    database: str
    admin: Credentials

    @classmethod
    def create(
        cls, root: Path, cluster: Postgres, database: str, admin: Credentials
    ) -> ServerSetup:
        cluster.create_database(database)
        cluster.create_database(f"{database}_auth")
        return cls(root, free_port(), cluster, database, admin)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment that points MLflow at this server as its admin (or as whoever
        `extra` names)."""
        return clean_env(MLFLOW_TRACKING_URI=self.uri, **(self.admin.env() | extra))


class OnSetup:
    """What a server tells from the setup it runs on."""

    setup: ServerSetup

    @property
    def uri(self) -> str:
        return self.setup.uri

    @property
    def artifacts(self) -> Path:
        return self.setup.artifacts

    @property
    def admin(self) -> Credentials:
        return self.setup.admin

    def env(self, **extra: str) -> dict[str, str]:
        return self.setup.env(**extra)


@dataclass(frozen=True)
class TrackingServer(OnSetup):
    setup: ServerSetup
    process: subprocess.Popen
    log: Path


@contextlib.contextmanager
def tracking_server(setup: ServerSetup, log_name: str = "server.log") -> Iterator[TrackingServer]:
    """`mlflow server --app-name basic-auth` on the setup's databases, serving its artifacts."""
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", setup.cluster.uri(setup.database),
        "--artifacts-destination", str(setup.artifacts),
        "--host", "127.0.0.1", "--port", str(setup.port), "--workers", "1",
        "--app-name", "basic-auth",
    ]  # fmt: skip
    config = setup.root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {setup.cluster.uri(f'{setup.database}_auth')}\n"
        f"admin_username = {setup.admin.username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Without it every request pays a PBKDF2 check of the password (MLflow's advice for
        # request-heavy clients such as a pipeline).
        "auth_cache_ttl_seconds = 60\n"
    )
    # The admin's password reaches the server by its environment only, as a Secret would.
    env = {k: v for k, v in clean_env().items() if not k.startswith("MLFLOW_TRACKING_")} | {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": setup.admin.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        # The GenAI job workers (a pool of huey processes) have nothing to do here.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = setup.root / log_name
    with running(command, env, f"{setup.uri}/health", log) as process:
        yield TrackingServer(setup, process, log)


class RestartableServer(OnSetup):
    """A tracking server that tests kill and start again on the same setup (same port, databases
    and artifacts), as a crashed pod comes back: `process` and `log` are the current life's,
    `logs` every life's."""

    def __init__(self, setup: ServerSetup) -> None:
        self.setup = setup
        self._lives = contextlib.ExitStack()
        self._current: TrackingServer | None = None
        self.logs: list[Path] = []
        self.start()

    def start(self) -> None:
        self.logs.append(self.setup.root / f"life-{len(self.logs) + 1}.log")
        self._current = self._lives.enter_context(tracking_server(self.setup, self.logs[-1].name))

    def kill(self) -> float:
        """SIGKILL, as a node that dies takes it; returns when it went (time.monotonic)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return time.monotonic()

    def close(self) -> None:
        self._lives.close()

    @property
    def process(self) -> subprocess.Popen:
        assert self._current is not None
        return self._current.process

    @property
    def log(self) -> Path:
        return self.logs[-1]
