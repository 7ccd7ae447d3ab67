"""The Optuna study a search writes and the report reads: storage, tables, the winner.

One trial is one candidate retrained at one rung (halving.py). Its user attributes say
which: `architecture`, `key` (the architecture as text), `rung`, `steps`, `tokens`; and
what came out: `value` / `stderr` / `per_item` of the rung metric, `score` / `score_stderr`
of the space's own metric at the last rung, `before` (rung 0, before retraining),
`tokens_trained`, `timings`. A trial's Optuna value is its rung metric.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna
import pandas as pd

from .errors import MinitronError
from .halving import rung_tau
from .metrics import Measurement, paired_stderr

__all__ = [
    "GRACE_SECONDS",
    "HEARTBEAT_SECONDS",
    "STUDY_NAME",
    "candidates_table",
    "final_ranking",
    "make_storage",
    "measurement",
    "rung_summary",
    "rung_values",
    "search_cost",
    "trials_table",
]

STUDY_NAME = "minitron"
ARCH_COLUMNS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) <= 0:
        raise MinitronError(f"{name}={raw!r} is not a whole number of seconds > 0: fix or unset it")
    return int(raw)


# A running trial beats every HEARTBEAT_SECONDS; one silent for GRACE_SECONDS is failed and
# retried once (its worker died). The environment overrides both (tests use a few seconds).
HEARTBEAT_SECONDS = _env_seconds("MINITRON_NAS_HEARTBEAT_SECONDS", 10)
GRACE_SECONDS = _env_seconds("MINITRON_NAS_GRACE_SECONDS", 30)
if GRACE_SECONDS <= HEARTBEAT_SECONDS:
    raise MinitronError(
        f"MINITRON_NAS_GRACE_SECONDS ({GRACE_SECONDS}) must exceed MINITRON_NAS_HEARTBEAT_SECONDS ({HEARTBEAT_SECONDS}): "
        "a live worker would be taken for dead; raise the grace period"
    )


def make_storage(url: str | None, out: Path):
    """SQLite in the run folder by default; any RDB URL with heartbeats; or a journal file."""
    url = url or f"sqlite:///{(Path(out) / 'study.db').resolve()}"
    if url.startswith(("sqlite", "postgresql", "mysql")):
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    if url.endswith((".log", ".journal")):
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    raise MinitronError(f"unsupported storage '{url}': use sqlite:///FILE, postgresql://..., or a FILE.journal path")


def _candidate_trials(study: optuna.Study, states=None) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran a candidate: not a worker's empty ask, not a duplicate of another trial."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if "rung" in t.user_attrs and "duplicate_of" not in t.user_attrs]


_FIELDS = {"value": ("value", "stderr", "per_item"), "score": ("score", "score_stderr", "score_per_item")}


def measurement(trial: optuna.trial.FrozenTrial, which: str = "value") -> Measurement | None:
    """The rung metric ("value") or the space's score ("score") a trial recorded."""
    value, stderr, per_item = (trial.user_attrs.get(name) for name in _FIELDS[which])
    return None if value is None else Measurement(value, stderr, 0.0, per_item)


def rung_values(study: optuna.Study, rung: int) -> dict[str, optuna.trial.FrozenTrial]:
    """Finished trials of one rung, by architecture key."""
    done = _candidate_trials(study, (optuna.trial.TrialState.COMPLETE,))
    return {t.user_attrs["key"]: t for t in done if t.user_attrs["rung"] == rung}


def final_ranking(study: optuna.Study, maximize_score: bool) -> list[optuna.trial.FrozenTrial]:
    """The last rung's finished candidates, best first by the space's score."""
    last = study.user_attrs.get("rungs", 1) - 1
    done = [t for t in rung_values(study, last).values() if t.user_attrs.get("score") is not None]
    sign = -1 if maximize_score else 1
    return sorted(done, key=lambda t: (sign * t.user_attrs["score"], t.user_attrs["key"]))


def search_cost(study: optuna.Study) -> dict:
    """Training tokens and seconds of every trial that ran (finished, failed or interrupted)."""
    tokens = seconds = 0.0
    for t in _candidate_trials(study):
        tokens += t.user_attrs.get("tokens_trained", 0)
        seconds += sum(t.user_attrs.get("timings", {}).values())
    return {"tokens": int(tokens), "seconds": round(seconds, 1)}


def _int(value):
    return None if value is None else int(value)


TRIAL_COLUMNS = (
    "rung", "tokens", *ARCH_COLUMNS, "params_total", "params_non_embedding", "before", "before_stderr", "value", "stderr",
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
    for column in ARCH_COLUMNS:
        attrs[column] = arch.get(column)
    timings = attrs.get("timings", pd.Series([None] * len(attrs), index=attrs.index))
    attrs["seconds"] = timings.map(lambda t: round(sum(t.values()), 2) if isinstance(t, dict) and t else None)
    table = pd.DataFrame({"trial": attrs.number, "state": attrs.state, **{c: attrs.get(c) for c in TRIAL_COLUMNS}}).reset_index(drop=True)
    counts = [*ARCH_COLUMNS, "params_total", "params_non_embedding", "tokens", "tokens_trained"]
    table[counts] = table[counts].astype("Int64")
    return table


def candidates_table(study: optuna.Study, maximize_score: bool) -> pd.DataFrame:
    """One row per architecture at the last rung it reached, with `tied_with_best`.

    A candidate is tied with the best when their difference is within one standard error
    (paired over the held-out blocks when both have per-block values): the search has no
    evidence that one is better.
    """
    table = trials_table(study)
    if table.empty:
        return table
    finished = table[table.state == "COMPLETE"]
    rows = []
    for key, group in table.groupby("key", sort=False):
        done = finished[finished.key == key]
        row = (done if not done.empty else group).sort_values("rung").iloc[-1].to_dict()
        row["last_rung"] = int(row.pop("rung"))
        rows.append(row)
    out = pd.DataFrame(rows)
    ranking = final_ranking(study, maximize_score)
    out["tied_with_best"] = False
    out["best"] = False
    if ranking:
        best = ranking[0]
        best_m = measurement(best, "score")
        for trial in ranking:
            other = measurement(trial, "score")
            se = paired_stderr(best_m, other)
            tie = trial is best or (se is not None and abs(best_m.value - other.value) <= se)
            out.loc[out.key == trial.user_attrs["key"], "tied_with_best"] = tie
        out.loc[out.key == best.user_attrs["key"], "best"] = True
    out = out.sort_values(["last_rung", "value"], ascending=[False, True], kind="stable")
    return out.reset_index(drop=True)


def rung_summary(study: optuna.Study, maximize_score: bool) -> list[dict]:
    """Per rung: candidates finished and kept, Kendall tau with the previous rung (with its n),
    and how many cut candidates were within one standard error of the last one kept."""
    rungs = study.user_attrs.get("rungs", 1)
    summary = []
    previous = None
    for index in range(rungs):
        done = rung_values(study, index)
        values = {k: t.user_attrs["value"] for k, t in done.items()}
        row = {"rung": index, "finished": len(done)}
        if index == 0:
            before = {k: t.user_attrs["before"] for k, t in done.items() if t.user_attrs.get("before") is not None}
            row["tau_before_retraining"], row["tau_before_n"] = rung_tau(before, values)
        if previous is not None:
            row["tau_with_previous"], row["tau_n"] = rung_tau(previous, values)
        following = rung_values(study, index + 1) if index + 1 < rungs else {}
        if following:
            kept = [k for k in done if k in following]
            row["kept"] = len(kept)
            worst = max(kept, key=lambda k: values[k]) if kept else None
            if worst is not None:
                w = measurement(done[worst])
                row["cut_within_one_se"] = sum(
                    1 for k, t in done.items() if k not in following and (se := paired_stderr(w, measurement(t))) is not None and abs(values[k] - w.value) <= se
                )
        summary.append(row)
        previous = values
    return summary
