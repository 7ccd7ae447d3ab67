"""The Optuna study a search writes and the report reads: storage, tables, the winner.

One trial is one candidate at one rung (halving.py): scored pruned at rung 0, retrained at
the others. Its params are the architecture's axes; its user attributes say which:
`architecture`, `key` (the architecture as text), `rung`, `order` (the data order: 0, or a
pilot order measuring the data-order error), `steps`, `tokens`; and what came out: `value`
/ `stderr` / `per_item` of the rung metric, `score` / `score_stderr` of the space's own
metric at the last rung, `pruned` (its rung-0 value), `tokens_trained`, `timings`. A
trial's Optuna value is its rung metric.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import warnings
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import optuna
import pandas as pd

from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.metrics import Measurement, tied
from minitron_nas.files import RunFolder
from minitron_nas.search.halving import break_tie, rung_tau, tie_keys

__all__ = [
    "FRONT_BY",
    "NO_LATENCY",
    "STUDY_NAME",
    "candidates_table",
    "check_study_file",
    "decide",
    "final_ranking",
    "heartbeat_seconds",
    "measurement",
    "open_storage",
    "order_noise",
    "pareto_front",
    "quiet_heartbeats",
    "recorded",
    "rung0_keys",
    "rung0_missing",
    "rung_summary",
    "rung_values",
    "search_complete",
    "search_cost",
    "storage_url",
    "trials_table",
]

STUDY_NAME = "minitron"
ARCH_COLUMNS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
FAMILY_COLUMNS = (  # MoE and hybrid sizes, and active parameters: kept only where some trial has them
    "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
    "mamba_num_heads", "mamba_head_dim", "num_mamba_layers", "num_attention_layers", "num_mlp_layers",
    "params_active",
)  # fmt: skip


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) <= 0:
        raise MinitronError(f"{name}={raw!r} is not a whole number of seconds > 0: fix or unset it")
    return int(raw)


def heartbeat_seconds() -> tuple[int, int]:
    """(beat, grace): a running trial beats every `beat` seconds; one silent for `grace` is failed
    and retried once (its worker died). The environment overrides both (tests use a few seconds)."""
    beat = _env_seconds("MINITRON_NAS_HEARTBEAT_SECONDS", 10)
    grace = _env_seconds("MINITRON_NAS_GRACE_SECONDS", 30)
    if grace <= beat:
        raise MinitronError(
            f"MINITRON_NAS_GRACE_SECONDS ({grace}) must exceed MINITRON_NAS_HEARTBEAT_SECONDS ({beat}): "
            "a live worker would be taken for dead; raise the grace period"
        )
    return beat, grace


@contextmanager
def quiet_heartbeats() -> Iterator[None]:
    """Optuna's heartbeats are experimental and warn at each use; inside this, they do not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage_url(url: str | None, out: Path) -> str:
    """The storage named, or by default SQLite in the run folder."""
    return url or f"sqlite:///{RunFolder(out).study_db.resolve()}"


def _check_local_store(path: Path) -> None:
    """A worker writes its study file: a missing folder or a read-only file is named here, not as a lost server."""
    if not path.parent.is_dir():
        raise MinitronError(f"the folder '{path.parent}' of the study file '{path.name}' does not exist: create it (mkdir -p), or point --storage elsewhere")
    if path.is_file() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        raise MinitronError(
            f"the study database '{path}' is read-only (the file or its folder): make both writable (chmod u+w), or copy it somewhere writable and pass that as --storage"
        )


def check_study_file(path: Path) -> None:
    """Refuse a cut or overwritten SQLite study before Optuna reads it as empty or rewrites it."""
    if not path.is_file():
        return
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.OperationalError:  # locked or busy (another worker writes it): Optuna waits for it
        return
    except sqlite3.DatabaseError as err:
        problem = str(err)
    if problem != "ok":
        raise MinitronError(f"the study database '{path}' is unreadable ({problem}): delete it to start the search over, or restore it from a copy")


def open_storage(url: str | None, out: Path, *, worker: bool = True):
    """Any RDB URL (SQLite, PostgreSQL, MySQL) or a journal file; SQLite in the run folder by default.

    A worker's RDB storage beats (a dead worker's trial is failed and retried once); a reader's
    does not, and refuses a missing local file rather than create an empty store."""
    url = storage_url(url, out)
    journal = url.endswith((".log", ".journal"))
    if not journal and not url.startswith(("sqlite", "postgresql", "mysql")):
        raise MinitronError(f"unsupported storage '{url}': use sqlite:///FILE, postgresql://..., or a FILE.journal path")
    local = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else Path(url) if journal else None
    if not worker and local is not None and not local.is_file():
        where = f"run folder '{out}'" if url == storage_url(None, out) else f"storage '{url}'"
        raise MinitronError(f"no study in {where} ({local} is missing): run `minitron-nas search` first or pass --storage")
    if local is not None and worker:
        _check_local_store(local)
    if local is not None and not journal:
        check_study_file(local)
    try:
        if journal:
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
        if not worker:
            return optuna.storages.RDBStorage(url)
        beat, grace = heartbeat_seconds()
        with quiet_heartbeats():
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                heartbeat_interval=beat,
                grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except MinitronError:
        raise
    except Exception as err:
        if local is None and _unreachable(err):
            raise  # a database server that does not answer: the CLI says so, and to check that it runs
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise MinitronError(f"cannot open storage '{url}' ({type(err).__name__}: {first}): check the URL or file") from None


def _unreachable(err: BaseException) -> bool:
    """A server's refused or lost connection (sqlalchemy's OperationalError or InterfaceError), here or behind `err`."""
    import sqlalchemy.exc  # optuna's dependency: imported with the RDB storage

    while err is not None:
        if isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _candidate_trials(study: optuna.Study, states=None) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran a candidate: not a worker's empty ask, not a duplicate of another trial."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if "rung" in t.user_attrs and "duplicate_of" not in t.user_attrs]


_FIELDS = {"value": ("value", "stderr", "per_item"), "score": ("score", "score_stderr", "score_per_item")}


def recorded(m: Measurement, which: str = "value") -> dict:
    """The user attributes that record a measurement as the rung metric ("value") or the space's score ("score")."""
    return dict(zip(_FIELDS[which], (m.value, m.stderr, m.per_item), strict=True))


def measurement(trial: optuna.trial.FrozenTrial, which: str = "value") -> Measurement | None:
    """The rung metric ("value") or the space's score ("score") a trial recorded; its
    per-block values make comparisons between two trials paired (metrics.paired_stderr)."""
    value, stderr, per_item = (trial.user_attrs.get(name) for name in _FIELDS[which])
    return None if value is None else Measurement(value, stderr, 0.0, per_item)


def rung_values(study: optuna.Study, rung: int) -> dict[str, optuna.trial.FrozenTrial]:
    """Finished trials of one rung on the search's own data order, by architecture key."""
    done = _candidate_trials(study, (optuna.trial.TrialState.COMPLETE,))
    return {t.user_attrs["key"]: t for t in done if t.user_attrs["rung"] == rung and not t.user_attrs.get("order")}


def rung0_keys(study: optuna.Study) -> set[str]:
    """Candidates rung 0 has dealt with: scored, failed, or stopped as too slow."""
    return {t.user_attrs["key"] for t in _candidate_trials(study) if t.user_attrs["rung"] == 0 and t.state != optuna.trial.TrialState.RUNNING}


def rung0_missing(study: optuna.Study) -> bool:
    return len(rung0_keys(study)) < study.user_attrs.get("rung0_candidates", 0)


def search_complete(study: optuna.Study) -> bool:
    """Every candidate of rung 0 dealt with, and the last rung done: nothing queued or running, a score stored."""
    if rung0_missing(study):
        return False
    last = study.user_attrs.get("rungs", 1) - 1
    live = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    if last > 0 and any(t.user_attrs["rung"] == last for t in _candidate_trials(study, live)):
        return False
    if any(t.user_attrs["rung"] < last for t in _candidate_trials(study, live)):
        return False
    return any(t.user_attrs.get("score") is not None for t in rung_values(study, last).values())


def order_noise(study: optuna.Study) -> tuple[float, int | None]:
    """(SD, degrees of freedom) of a retrained value's data-order error: the spread of rung 1's
    pilot candidate over its data orders (its own order included); (0, None) until the pilot
    has run, or when it is off. Measured at the cheapest retraining rung and assumed for the
    later ones; its few degrees of freedom widen every judgement of noise (metrics.tied)."""
    pilot = study.user_attrs.get("pilot")
    values = [
        t.user_attrs["value"]
        for t in _candidate_trials(study, (optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs["rung"] == 1 and t.user_attrs["key"] == pilot
    ]
    return (statistics.stdev(values), len(values) - 1) if len(values) >= 2 else (0.0, None)


def final_ranking(study: optuna.Study, maximize_score: bool) -> list[optuna.trial.FrozenTrial]:
    """The last rung's finished candidates, best first by the space's score (equal scores by the tie rule)."""
    last = study.user_attrs.get("rungs", 1) - 1
    done = [t for t in rung_values(study, last).values() if t.user_attrs.get("score") is not None]
    sign = -1 if maximize_score else 1
    return sorted(done, key=lambda t: (sign * t.user_attrs["score"], tie_keys(t.user_attrs)))


def decide(study: optuna.Study, maximize_score: bool) -> tuple[optuna.trial.FrozenTrial, list[str], str | None] | None:
    """(the winner, the keys tied with the best, the rule that broke the tie or None): the best
    score wins unless others are within one standard error of it; then TIE_RULE decides."""
    ranking = final_ranking(study, maximize_score)
    if not ranking:
        return None
    by_key = {t.user_attrs["key"]: t for t in ranking}
    scores = {k: measurement(t, "score") for k, t in by_key.items()}
    sd, dof = _score_order_noise(study, ranking[0])
    winner, tied_keys, rule = break_tie(scores, {k: tie_keys(t.user_attrs) for k, t in by_key.items()}, maximize_score, sd, dof)
    return by_key[winner], tied_keys, rule


FRONT_BY = ("params", "latency")  # the size a Pareto front is drawn over: total parameters, or decode latency
NO_LATENCY = "the search measured no decode latency: set `latency: {measure: true}` in the space and search again into a new --out, or use --front-by params"


def pareto_front(study: optuna.Study, maximize_score: bool, by: str = "params") -> list[optuna.trial.FrozenTrial]:
    """The last rung's candidates that no other beats on size and score together, smallest first.

    B dominates A when B is no larger and scores better beyond noise, or when B ties A (within
    one standard error, as `decide` judges a tie) and is strictly smaller: a larger model must
    earn its size with a difference the noise cannot explain. Size is `params_total`, or with
    `by="latency"` the decode time per token measured at rung 0 (refused when not measured).
    """
    ranking = final_ranking(study, maximize_score)
    if by == "latency" and not all(t.user_attrs.get("decode_tokens_per_s") for t in ranking):
        raise MinitronError(NO_LATENCY)
    size = {t.number: t.user_attrs["params_total"] if by == "params" else 1.0 / t.user_attrs["decode_tokens_per_s"] for t in ranking}
    score = {t.number: measurement(t, "score") for t in ranking}
    sd, dof = _score_order_noise(study, ranking[0]) if ranking else (0.0, None)
    sign = -1 if maximize_score else 1

    def dominates(b: optuna.trial.FrozenTrial, a: optuna.trial.FrozenTrial) -> bool:
        sb, sa = score[b.number], score[a.number]
        if sb.value == sa.value or tied(sb, sa, 2 * sd**2, dof):
            return size[b.number] < size[a.number]
        return size[b.number] <= size[a.number] and sign * (sb.value - sa.value) < 0

    front = [a for a in ranking if not any(dominates(b, a) for b in ranking if b is not a)]
    return sorted(front, key=lambda t: size[t.number])  # stable: equal sizes keep the ranking's order


def _score_order_noise(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[float, int | None]:
    """The data-order error applies to a retrained score that is the rung metric itself (none for pruned scores)."""
    if trial.user_attrs["rung"] == 0 or study.user_attrs.get("metric") != study.user_attrs.get("rung_metric"):
        return 0.0, None
    return order_noise(study)


def search_cost(study: optuna.Study) -> dict:
    """Training tokens and seconds of every trial that ran (finished, failed or interrupted)."""
    tokens = seconds = 0.0
    for t in _candidate_trials(study):
        tokens += t.user_attrs.get("tokens_trained", 0)
        seconds += sum(t.user_attrs.get("timings", {}).values())
    return {"tokens": int(tokens), "seconds": round(seconds, 1)}


TRIAL_COLUMNS = (
    "rung", "order", "tokens", *ARCH_COLUMNS, "params_total", "params_non_embedding", "before", "before_stderr", "value", "stderr",
    "score", "score_stderr", "tokens_trained", "decode_tokens_per_s", "prefill_tokens_per_s", "seconds", "key", "error",
)  # fmt: skip


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per candidate trial (every rung), with its value, error and cost: Optuna's
    `trials_dataframe`, its user attributes unpacked (the architecture into its axes)."""
    frame = study.trials_dataframe(attrs=("number", "state", "user_attrs"))
    if frame.empty or "user_attrs_rung" not in frame:
        return pd.DataFrame()
    frame = frame[frame.user_attrs_rung.notna() & (frame.get("user_attrs_duplicate_of", pd.Series(index=frame.index)).isna())]
    attrs = frame.rename(columns=lambda c: c.removeprefix("user_attrs_"))
    arch = pd.DataFrame(list(attrs.get("architecture", pd.Series([{}] * len(attrs))).map(lambda a: a if isinstance(a, dict) else {})), index=attrs.index)
    for column in ARCH_COLUMNS + FAMILY_COLUMNS[:-1]:
        attrs[column] = arch.get(column)
    timings = attrs.get("timings", pd.Series([None] * len(attrs), index=attrs.index))
    attrs["seconds"] = timings.map(lambda t: round(sum(t.values()), 2) if isinstance(t, dict) and t else None)
    moe = [c for c in FAMILY_COLUMNS if attrs.get(c) is not None and attrs[c].notna().any()]
    table = pd.DataFrame({"trial": attrs.number, "state": attrs.state, **{c: attrs.get(c) for c in TRIAL_COLUMNS + tuple(moe)}}).reset_index(drop=True)
    counts = [*ARCH_COLUMNS, *moe, "params_total", "params_non_embedding", "tokens", "tokens_trained", "order"]
    table[counts] = table[counts].astype("Int64")
    return table


def candidates_table(study: optuna.Study, maximize_score: bool) -> pd.DataFrame:
    """One row per architecture at the last rung it reached (its own data order), with
    `tied_with_best` and `best` as `decide` finds them: a candidate within one standard error
    of the best score (the data-order error included where it applies) is tied with it."""
    table = trials_table(study)
    if table.empty:
        return table
    table = table[table["order"].fillna(0).eq(0)]
    done_last = table.assign(_done=table.state.eq("COMPLETE")).sort_values(["_done", "rung"], kind="stable")
    out = done_last.drop_duplicates("key", keep="last").drop(columns="_done").rename(columns={"rung": "last_rung"})
    out["last_rung"] = out["last_rung"].astype(int)
    out["tied_with_best"] = False
    out["best"] = False
    decision = decide(study, maximize_score)
    if decision is not None:
        best, tied_keys, _ = decision
        out.loc[out.key.isin([best.user_attrs["key"], *tied_keys]), "tied_with_best"] = True
        out.loc[out.key == best.user_attrs["key"], "best"] = True
    out = out.sort_values(["last_rung", "value"], ascending=[False, True], kind="stable")
    return out.reset_index(drop=True)


def rung_summary(study: optuna.Study, maximize_score: bool) -> list[dict]:
    """Per rung: candidates finished and kept (by rank, and within noise of the cut), the
    data-order error used at the cut, and Kendall tau with the previous rung with its n and
    95% bootstrap interval (withheld below halving.TAU_MIN_N)."""
    rungs = study.user_attrs.get("rungs", 1)
    summary = []
    previous = None
    for index in range(rungs):
        done = rung_values(study, index)
        values = {k: t.user_attrs["value"] for k, t in done.items()}
        row = {"rung": index, "finished": len(done)}
        if previous is not None:
            tau = rung_tau(previous, values)
            row.update(tau_with_previous=tau["tau"], tau_n=tau["n"], tau_low=tau["low"], tau_high=tau["high"])
        cut = study.user_attrs.get(f"cut_{index}")
        if cut:
            row.update(kept=len(cut["kept"]) + len(cut["within_noise"]), kept_within_noise=len(cut["within_noise"]), order_stderr=cut["order_stderr"])
        summary.append(row)
        previous = values
    return summary
