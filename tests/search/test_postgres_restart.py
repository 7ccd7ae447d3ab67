"""The study's PostgreSQL server restarts while three `minitron-nas search` workers share a grid.

Workers either ride over the restart (SQLAlchemy's pool_pre_ping replaces the dropped
connections) or stop with one `error:` line; a `--resume` afterwards finishes the grid, and
every candidate has been evaluated exactly once among the finished trials (completed, or pruned
on a reported value). Written against
the command line and Optuna's public API only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from helpers import byte_tokenizer, tiny_model

from minitron_nas.model.saving import save_model
from minitron_nas.model.teachers import load_config
from minitron_nas.search.candidates import load_space, require_feasible

pytestmark = pytest.mark.postgres

ENV = {**os.environ, "MINITRON_NAS_HEARTBEAT_SECONDS": "1", "MINITRON_NAS_GRACE_SECONDS": "4", "OMP_NUM_THREADS": "1"}
AXES = {"hidden_size": [32, 48], "intermediate_size": [48, 96], "heads_per_group": [1], "num_key_value_heads": [2], "num_hidden_layers": [2, 3, 4]}
RUNNING = optuna.trial.TrialState.RUNNING
# Evaluated: retrained and scored to the end (COMPLETE), or stopped on its reported held-out value (PRUNED).
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture
def space_file(tmp_path, shared_data) -> Path:
    save_model(tiny_model("llama", vocab_size=257), tmp_path / "teacher", byte_tokenizer())
    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "teacher": str(tmp_path / "teacher"),
                "axes": AXES,
                "budget": {"parameters": 40_000, "tolerance": 0.25},
                "ranking": {"data": corpus, "samples": 8, "seq_len": 32},
                # long enough that all three workers are mid-trial at the restart (rung 1: 1,000 steps)
                "retrain": {"tokens": 3000 * 4 * 32, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "top_k": 32, "data": corpus, "eval_every": 0},
                "scoring": {"metric": "heldout_loss", "heldout_samples": 4, "seq_len": 32},
                "halving": {"order_pilot": 0, "within_noise": 0},  # exactly the planned candidates per rung
                "sampler": "grid",
            }
        )
    )
    return path


def cli() -> list[str]:
    return [sys.executable, "-m", "minitron_nas.cli"]


class Worker:
    def __init__(self, name: str, space: Path, url: str, root: Path, resume: bool):
        self.name, self.log = name, root / f"{name}.log"
        command = [*cli(), "search", str(space), "--storage", url, "--out", str(root / name)] + (["--resume"] if resume else [])
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def workers():
    started: list[Worker] = []
    yield started
    for w in started:
        if w.process.poll() is None:
            w.process.kill()
            w.process.wait()


def wait_for(condition, what: str, workers: list[Worker], timeout: float = 480, exits_ok: bool = False):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except (sqlalchemy.exc.DBAPIError, KeyError):  # the server is restarting, or the study is not there yet
            value = None
        if value:
            return value
        if not exits_ok:
            for w in workers:
                if w.process.poll() not in (None, 0):
                    pytest.fail(f"{w.name} exited with {w.process.returncode} while waiting for {what}:\n{w.text()[-3000:]}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n" + "\n".join(f"--- {w.name}\n{w.text()[-2000:]}" for w in workers))


def trials(url: str):
    return optuna.load_study(study_name="minitron", storage=url).trials


def restart(postgres_server, url: str, down_seconds: float = 2.0) -> None:
    """Stop the server (connections dropped), keep it down a moment, start it again the same way."""
    bin_dir, port = postgres_server
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        data = connection.execute(sqlalchemy.text("SHOW data_directory")).scalar()
        sockets = connection.execute(sqlalchemy.text("SHOW unix_socket_directories")).scalar()
    engine.dispose()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    pg_ctl = [*as_postgres, str(bin_dir / "pg_ctl"), "-D", data]
    subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)
    time.sleep(down_seconds)
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    log = Path(data).parent / "server.log"
    subprocess.run([*pg_ctl, "-l", str(log), "-w", "-t", "60", "-o", options, "start"], check=True, capture_output=True)


def stopped_cleanly(w: Worker) -> None:
    """Exit 0, or exit 2 with one `error:` line last (the lost connection), never a traceback from the main thread."""
    code, text = w.process.returncode, w.text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert code in (0, 2), f"{w.name} exited with {code}:\n{text[-3000:]}"
    if code == 2:
        assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, text[-3000:]
    assert "Traceback" not in text, f"{w.name}:\n{text[-3000:]}"


def test_a_database_restart_mid_search_loses_no_candidate(space_file, postgres_server, postgres_url, tmp_path, workers):
    spec = load_space(space_file)
    feasible = require_feasible(spec, load_config(spec.teacher))
    n = len(feasible)
    workers.append(Worker("w0", space_file, postgres_url, tmp_path, resume=False))
    wait_for(lambda: "search (new study)" in workers[0].text(), "the first worker to create the study", workers)
    wait_for(lambda: len(trials(postgres_url)) >= n, "the first worker to queue the grid", workers)
    workers += [Worker(f"w{i}", space_file, postgres_url, tmp_path, resume=True) for i in (1, 2)]
    wait_for(lambda: len([t for t in trials(postgres_url) if t.state == RUNNING]) == 3, "all three workers mid-trial", workers)

    restart(postgres_server, postgres_url)
    wait_for(lambda: all(w.process.poll() is not None for w in workers), "every worker to finish or stop", workers, exits_ok=True)
    for w in workers:
        stopped_cleanly(w)

    last = Worker("resume", space_file, postgres_url, tmp_path, resume=True)
    workers.append(last)
    wait_for(lambda: last.process.poll() is not None, "the resumed search to finish", [last], exits_ok=True)
    assert last.process.returncode == 0, last.text()[-3000:]

    from minitron_nas.search.runner import schedule_for

    done = [t for t in trials(postgres_url) if t.state == optuna.trial.TrialState.COMPLETE and "rung" in t.user_attrs and "duplicate_of" not in t.user_attrs]
    pairs = sorted((t.user_attrs["rung"], t.user_attrs["key"]) for t in done if not t.user_attrs.get("order"))
    assert len(pairs) == len(set(pairs)), f"a candidate ran twice at one rung: {pairs}"
    first = sorted(key for rung, key in pairs if rung == 0)
    assert first == sorted(
        f"{c.arch.hidden_size}/{c.arch.intermediate_size}/{c.arch.num_attention_heads}:{c.arch.num_key_value_heads}/{c.arch.num_hidden_layers}"
        for c in feasible
    )
    rungs = schedule_for(spec, n).rungs
    assert [sum(1 for rung, _ in pairs if rung == r.index) for r in rungs] == [r.candidates for r in rungs], pairs
    assert not [t for t in trials(postgres_url) if t.state in (RUNNING, optuna.trial.TrialState.WAITING)]
