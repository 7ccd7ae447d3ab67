"""Several `minitron-nas search` workers on one study in a real PostgreSQL server.

Each worker is a separate process with its own --out (rankings, teacher logits, trials.csv)
and the same SPACE and --storage URL, as on separate machines. The grid is queued once as
WAITING trials that workers pop atomically. In the kill test the study is queued by this
process (as a first worker would) and three workers join it together, so that all three
are soon mid-trial at once; one is then frozen and killed, its trial goes stale, and a
surviving worker fails it through Optuna's heartbeat and runs its one retry.
Heartbeat and grace period are shortened through the environment so the tests stay short.
"""

from __future__ import annotations

import os
import re
import signal
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
from minitron_nas.search import runner as search
from minitron_nas.search.candidates import load_space, require_feasible

pytestmark = pytest.mark.postgres

HEARTBEAT, GRACE = 1, 4
WORKER_ENV = {
    **os.environ,
    "MINITRON_NAS_HEARTBEAT_SECONDS": str(HEARTBEAT),
    "MINITRON_NAS_GRACE_SECONDS": str(GRACE),
    "OMP_NUM_THREADS": "1",  # three workers share two cores
}
# Six feasible candidates on the tiny Llama teacher (nine for the kill test, which needs some
# still waiting once all three workers run); retraining long enough that workers overlap, and
# scored only at its end (eval_every 0) so the pruner cannot cut trials short.
AXES = {"hidden_size": [32, 48], "intermediate_size": [48, 96], "heads_per_group": [1], "num_key_value_heads": [2], "num_hidden_layers": [2, 3, 4]}
AXES_9 = {**AXES, "heads_per_group": [1, 3]}
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
RUNNING, WAITING = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING


@pytest.fixture(scope="module")
def spaces(tmp_path_factory, shared_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pg-space")
    save_model(tiny_model("llama", vocab_size=257), root / "teacher", byte_tokenizer())
    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    files = {}
    # six: the two late workers join ~20-30 s after the first (imports, resume grace): trials
    # must be long enough that the first has not finished the grid by then. nine: after the
    # kill, the survivors must still be busy GRACE seconds later to notice the stale trial, and
    # rung 1's trials (a third of the steps, ~100 tiny steps a second) must last seconds, not one,
    # or three never run at once between two polls.
    for name, axes, tolerance, steps in (("six", AXES, 0.25, 192), ("nine", AXES_9, 0.3, 3072)):
        files[name] = root / f"{name}.yaml"
        files[name].write_text(
            yaml.safe_dump(
                {
                    "teacher": str(root / "teacher"),
                    "axes": axes,
                    "budget": {"parameters": 40_000, "tolerance": tolerance},
                    "ranking": {"data": corpus, "samples": 8, "seq_len": 32},
                    "retrain": {"tokens": steps * 4 * 32, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "top_k": 32, "data": corpus, "eval_every": 0},
                    "scoring": {"metric": "heldout_loss", "heldout_samples": 4, "seq_len": 32},
                    "halving": {"eta": 3, "order_pilot": 0, "within_noise": 0},  # exactly the planned candidates per rung
                    "sampler": "grid",
                }
            )
        )
    return files


def grid_size(space_file: Path) -> int:
    spec = load_space(space_file)
    return len(require_feasible(spec, load_config(spec.teacher)))


def cli() -> list[str]:
    script = Path(sys.executable).parent / "minitron-nas"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "minitron_nas.cli"]


class Worker:
    def __init__(self, name: str, space: Path, url: str, root: Path, resume: bool):
        self.name, self.log = name, root / f"{name}.log"
        command = [*cli(), "search", str(space), "--storage", url, "--out", str(root / name)] + (["--resume"] if resume else [])
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=WORKER_ENV, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def trials_run(self) -> set[int]:
        """Trial numbers this worker finished, from Optuna's log lines in its own output."""
        return {int(n) for n in re.findall(r"^trial (\d+) · ", self.text(), flags=re.MULTILINE)}

    def signal(self, sig: int) -> None:
        os.killpg(self.process.pid, sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def workers():
    started: list[Worker] = []
    yield started
    for w in started:  # never leave workers behind (the database is dropped next)
        w.stop()


def wait_for(condition, what: str, workers: list[Worker], timeout: float = 480):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        for w in workers:
            if w.process.poll() not in (None, 0):
                pytest.fail(f"{w.name} exited with {w.process.returncode} while waiting for {what}:\n{w.text()[-3000:]}")
        time.sleep(0.25)
    logs = "\n".join(f"--- {w.name}\n{w.text()[-2000:]}" for w in workers)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")


def finish(workers: list[Worker]) -> None:
    wait_for(lambda: all(w.process.poll() is not None for w in workers), "every worker to finish", workers)
    for w in workers:
        assert w.process.returncode == 0, f"{w.name} exited with {w.process.returncode}:\n{w.text()[-3000:]}"


def study_trials(url: str, n: int):
    """The study's trials once the first worker has created it and queued the whole grid, else None.

    Polls with plain SQL first: creating an Optuna storage on the empty database would race the
    first worker's own schema creation.
    """
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            found = connection.execute(sqlalchemy.text("SELECT count(*) FROM studies WHERE study_name = 'minitron'")).scalar()
            queued = connection.execute(sqlalchemy.text("SELECT count(*) FROM trials")).scalar()
    except sqlalchemy.exc.DBAPIError:
        return None  # tables not created yet
    finally:
        engine.dispose()
    if not found or queued < n:
        return None
    return load(url).trials


def load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="minitron", storage=url)


def states(trials, *wanted: optuna.trial.TrialState):
    return [t for t in trials if t.state in wanted]


def planned(space_file: Path) -> list[int]:
    """Candidates per rung of the space's schedule."""
    spec = load_space(space_file)
    return [r.candidates for r in search.schedule_for(spec, len(require_feasible(spec, load_config(spec.teacher)))).rungs]


def assert_every_candidate_once(trials, space_file: Path) -> list:
    """Each (rung, architecture) finished exactly once, as many per rung as planned, nothing left."""
    evaluated = [t for t in states(trials, optuna.trial.TrialState.COMPLETE) if "rung" in t.user_attrs and "duplicate_of" not in t.user_attrs]
    pairs = [(t.user_attrs["rung"], t.user_attrs["key"]) for t in evaluated]
    assert len(pairs) == len(set(pairs)), f"a candidate ran twice at one rung: {sorted(pairs)}"
    per_rung = [sum(1 for rung, _ in pairs if rung == r) for r in range(len(planned(space_file)))]
    assert per_rung == planned(space_file), f"per rung {per_rung}, planned {planned(space_file)}"
    assert not states(trials, WAITING, RUNNING)
    for t in evaluated:  # every result stored in the shared study
        assert t.user_attrs["architecture"] and t.user_attrs["params_total"] > 0 and t.user_attrs["stderr"] > 0
        assert t.value == pytest.approx(t.user_attrs["value"]) and (t.user_attrs["rung"] == 0 or t.user_attrs["retrain_curve"])
    return evaluated


def test_three_workers_share_one_grid_each_candidate_once(spaces, postgres_url, tmp_path, workers):
    space_file = spaces["six"]
    n = grid_size(space_file)
    assert n == 6
    workers.append(Worker("w0", space_file, postgres_url, tmp_path, resume=False))
    wait_for(lambda: study_trials(postgres_url, n), "the first worker to queue the grid", workers)
    workers += [Worker(f"w{i}", space_file, postgres_url, tmp_path, resume=True) for i in (1, 2)]
    finish(workers)

    trials = load(postgres_url).trials
    assert not states(trials, optuna.trial.TrialState.FAIL), [t.user_attrs.get("error") for t in trials]
    evaluated = assert_every_candidate_once(trials, space_file)
    retrained = {t.number for t in evaluated if t.user_attrs["rung"] > 0}  # rung 0's candidates are stored without a line each
    ran = [w.trials_run() & retrained for w in workers]
    assert sum(len(r) for r in ran) == sum(planned(space_file)[1:]) and set().union(*ran) == retrained  # none twice
    assert sum(1 for r in ran if r) >= 2, f"the grid was not shared: {ran}"
    for w in workers:  # each worker's local view lists the whole shared study
        assert (tmp_path / w.name / "trials.csv").is_file() and (tmp_path / w.name / "rankings" / "rankings.json").is_file()


def queue_grid(space_file: Path, url: str, out: Path) -> None:
    """Create the study and queue the grid as a first worker does (open_study), from this process."""
    from minitron_nas.model.teachers import load_teacher
    from minitron_nas.search.study import open_storage

    spec = load_space(space_file)
    pool = search.candidate_pool(spec, require_feasible(spec, load_config(spec.teacher)))
    teacher = load_teacher(spec.teacher)
    search.open_study(spec, open_storage(url, out), url, False, teacher.fingerprint, pool, search.schedule_for(spec, len(pool)))


def test_a_worker_killed_mid_trial_is_failed_by_heartbeat_and_retried_once(spaces, postgres_url, tmp_path, workers):
    space_file = spaces["nine"]
    n = grid_size(space_file)
    assert n == 9
    queue_grid(space_file, postgres_url, tmp_path)
    # Three workers join the queued study together, so all three soon run a trial at once.
    workers += [Worker(f"w{i}", space_file, postgres_url, tmp_path, resume=True) for i in range(3)]
    victim, survivors = workers[0], workers[1:]

    def all_three_mid_trial():
        """Freeze the victim when three trials run (so one is its own) and three still wait."""

        def enough(trials):
            return len(states(trials, RUNNING)) == 3 and len(states(trials, WAITING)) >= 3

        if not enough(load(postgres_url).trials):
            return None
        victim.signal(signal.SIGSTOP)  # now its trial cannot move: check again, race-free
        trials = load(postgres_url).trials
        if enough(trials):
            return states(trials, RUNNING)
        victim.signal(signal.SIGCONT)
        return None

    running = wait_for(all_three_mid_trial, "all three workers mid-trial with three candidates waiting", workers)
    victim.signal(signal.SIGKILL)  # the whole process group, as a lost machine
    victim.process.wait()
    finish(survivors)

    trials = load(postgres_url).trials
    failed = states(trials, optuna.trial.TrialState.FAIL)
    assert len(failed) == 1, [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    killed = failed[0]
    assert killed.number in {t.number for t in running}
    assert killed.number not in set().union(*(w.trials_run() for w in workers))  # nobody finished it
    assert "error" not in killed.user_attrs  # no exception in the objective: its heartbeat stopped
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, "retried exactly once (RetryHeartbeatStaleTrialCallback(max_retry=1))"
    retry = retries[0]
    assert retry.system_attrs["retry_history"] == [killed.number]
    assert retry.state in DONE and (retry.user_attrs["rung"], retry.user_attrs["key"]) == (killed.user_attrs["rung"], killed.user_attrs["key"])
    # The candidate is evaluated once, by a live worker: by the retry, or, when two workers closed the
    # rung at once and each queued it, by that earlier live copy, the retry then pruned as its duplicate.
    ran = retry.number if retry.state == optuna.trial.TrialState.COMPLETE else retry.user_attrs.get("duplicate_of")
    assert ran is not None, (retry.number, retry.state.name, retry.user_attrs)
    assert ran in survivors[0].trials_run() | survivors[1].trials_run()  # picked up by a live worker
    evaluated = assert_every_candidate_once(trials, space_file)
    assert ran in {t.number for t in evaluated}
