"""Fixtures the tests share: the benchmark data folder, each model family, a PostgreSQL server.

Plain helpers (tiny models, a byte tokenizer, the one-line-error check) are in helpers.py.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from helpers import FAMILY_NAMES, SHARED_DATA


@pytest.fixture(autouse=True)
def interruptible():
    """A command interrupted in process ignores further Ctrl-C while it exits; the test session goes on taking it."""
    yield
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(params=FAMILY_NAMES)
def family_name(request):
    return request.param


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext2" / "valid.txt").is_file():
        pytest.fail(f"shared data not found at {SHARED_DATA}: tests need ../shared/data beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def corpus(shared_data) -> str:
    """The small text (tiny Shakespeare) the end-to-end tests rank, retrain and distill on."""
    return str(shared_data / "tinyshakespeare" / "input.txt")


# --------------------------------------------------------------------------- a throwaway PostgreSQL server
# Self-contained (own imports): `postgres_url` is a fresh, empty database `minitron` on a
# server started on loopback for the session; tests that use it are marked `postgres`.


def _postgres_bin() -> Path:
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not found:
        pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): run `make postgres`")
    return Path(found[-1]).parent


@pytest.fixture(scope="session")
def postgres_server():
    """(bin folder, port) of a server in a temporary folder, stopped and removed at the end."""
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    bin_dir = _postgres_bin()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses root
    root = Path(tempfile.mkdtemp(prefix="minitron-pg-"))  # under /tmp: the postgres user can reach it
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*command: str) -> None:
        done = subprocess.run([*as_postgres, *command], capture_output=True, text=True)
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.is_file() else ""
            pytest.fail(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()} {tail}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    # max_connections: every worker process holds a pool of connections, and a killed one's linger until
    # the server notices; the default 100 was exhausted once in CI ("sorry, too many clients already").
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
    try:
        yield bin_dir, port
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database `minitron` on the session's server (dropped afterwards, workers or not)."""
    import subprocess

    bin_dir, port = postgres_server
    client = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    subprocess.run([str(bin_dir / "dropdb"), *client, "--if-exists", "--force", "minitron"], check=True, capture_output=True)
    subprocess.run([str(bin_dir / "createdb"), *client, "minitron"], check=True, capture_output=True)
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/minitron"
    subprocess.run([str(bin_dir / "dropdb"), *client, "--if-exists", "--force", "minitron"], capture_output=True)
