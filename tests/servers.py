"""Tracking servers for the tests, as teams run them: a PostgreSQL cluster of the test session's
own (Debian's package, a temp folder, a free loopback port) and `mlflow server` on it behind
MLflow's basic-auth app, with the artifacts the server serves (clients see mlflow-artifacts:/
URIs); or, the embedded default's twin, `mlflow server` on a SQLite file. Started and stopped like
the model servers of steps/serving/processes.py."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from steps.serving.processes import clean_env, free_port, running


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

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

    def create_database(self, name: str) -> str:
        """A new database; its SQLAlchemy URI."""
        self.psql(f'CREATE DATABASE "{name}"')
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the tests install psycopg2.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

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
class TrackingServer:
    uri: str
    backend_store: str  # the SQLAlchemy URI of its store
    artifacts: Path
    log: Path
    process: subprocess.Popen
    admin: Credentials | None  # None: no authentication

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment that points MLflow at this server as its admin."""
        admin = self.admin.env() if self.admin else {}
        return clean_env(MLFLOW_TRACKING_URI=self.uri, **admin, **extra)


@dataclass(frozen=True)
class ServerSetup:
    """What a tracking server is started from; starting it again from the same setup (same port,
    store and artifacts) is a restart."""

    root: Path
    port: int
    backend_store: str
    auth_database: str | None = None  # None: no authentication
    admin: Credentials | None = None

    @classmethod
    def sqlite(cls, root: Path) -> ServerSetup:
        return cls(root, free_port(), f"sqlite:///{root / 'server.db'}")

    @classmethod
    def postgres_with_auth(cls, root: Path, cluster: Postgres, name: str) -> ServerSetup:
        admin = Credentials("admin", secrets.token_urlsafe(16))
        return cls(
            root,
            free_port(),
            cluster.create_database(name),
            cluster.create_database(f"{name}_auth"),
            admin,
        )


@contextlib.contextmanager
def tracking_server(setup: ServerSetup, log_name: str = "server.log") -> Iterator[TrackingServer]:
    uri = f"http://127.0.0.1:{setup.port}"
    artifacts = setup.root / "artifacts"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", setup.backend_store,
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(setup.port), "--workers", "1",
    ]  # fmt: skip
    env = clean_env()
    if setup.auth_database:
        assert setup.admin is not None
        config = setup.root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {setup.auth_database}\n"
            f"admin_username = {setup.admin.username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        command += ["--app-name", "basic-auth"]
        env |= {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": setup.admin.password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
    log = setup.root / log_name
    with running(command, env, f"{uri}/health", log) as process:
        yield TrackingServer(uri, setup.backend_store, artifacts, log, process, setup.admin)
