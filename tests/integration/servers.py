"""Real PostgreSQL and Redis servers for the integration tests: started on free loopback ports in temporary
folders, stopped by the fixtures that start them. Nothing here mocks a server.

The binaries come from Debian's `postgresql` and `redis-server` packages (`make test` installs them).
initdb refuses to run as root, so as root the server runs as the `postgres` system user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

READY_TIMEOUT_S = 60  # a server that is not up by then has failed to start; not a timed assertion


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin(name: str) -> str:
    """Debian keeps initdb and pg_ctl out of PATH, under /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"{name} not found: install Debian's postgresql package (make test does)")
    return found


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def env(self, db: str) -> dict[str, str]:
        """The SDP_PG_* variables dagster_home/postgres/dagster.yaml reads."""
        return {"SDP_PG_HOST": self.host, "SDP_PG_PORT": str(self.port), "SDP_PG_USER": self.user,
                "SDP_PG_PASSWORD": self.password, "SDP_PG_DB": db}

    def connect(self, db: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=db)

    def create_database(self, name: str) -> str:
        connection = self.connect()
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return name


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    pwd.getpwnam("postgres")  # KeyError: no postgres user, i.e. the Debian package is missing
    return ["runuser", "-u", "postgres", "--", *command]


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A fresh cluster (initdb) served by pg_ctl on a free port; stopped and deleted afterwards."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    # Not under pytest's tmp dir: that is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="sdp-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"
    user, password, port = "sdp", "sdp-test", free_port()
    pw_file = root / "pw"
    pw_file.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(pw_file, "postgres", "postgres")
    subprocess.run(_as_server_user([initdb, "-D", str(data), "-U", user, f"--pwfile={pw_file}", "--auth=md5",
                                    "-E", "UTF8", "--no-sync", "--no-instructions"]),
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w",
                                    "-t", str(READY_TIMEOUT_S), "start"]), check=True, capture_output=True)
    try:
        yield Postgres("127.0.0.1", port, user, password)
    finally:
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Redis:
    port: int

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@contextmanager
def redis_server() -> Iterator[Redis]:
    """redis-server on a free port, no persistence; terminated afterwards."""
    import redis

    binary = shutil.which("redis-server")
    if not binary:
        pytest.fail("redis-server not found: install Debian's redis-server package (make test does)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sdp-redis-") as folder:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", folder],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {port}") from None
                    time.sleep(0.1)
            yield Redis(port)
        finally:
            process.terminate()
            process.wait(timeout=30)
