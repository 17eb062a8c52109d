"""The Optuna side: a multi-objective TPE study in SQLite, resumable and readable by other tools.

The study names its objectives (`marker_rate` or `likelihood`, and `kl`, both minimised); every free
search parameter is a plain Optuna parameter; what was fixed, the model, the directions file and the
evaluation settings are study user attributes, so `patcher ablate --from-study` can rebuild any trial's edit.
"""

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from patcher import __version__
from patcher.errors import PatcherError

STUDY_NAME = "patcher-search"
METRICS = ["marker_rate", "kl"]


LABELS = {"marker_rate": "marker rate", "likelihood": "refusal likelihood"}  # as the output names them


def metric_names(objective: str = "markers") -> list[str]:
    """The study's objective names: the marker rate, or the refusal likelihood, and the KL."""
    return METRICS if objective == "markers" else [objective, "kl"]


def objective_of(attrs: dict) -> str:
    """The objective a study's recorded settings name (studies before the option: markers)."""
    return attrs.get("evaluation", {}).get("objective", "markers")


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage_url(path: Path, read_only: bool = False) -> str:
    if read_only:  # optuna creates its tables in any SQLite file it opens: not in one we only read
        from urllib.parse import quote

        return f"sqlite:///file:{quote(str(Path(path).resolve()))}?mode=ro&uri=true"
    return f"sqlite:///{Path(path).resolve()}"


def _constraints(trial):
    return trial.user_attrs.get("constraint", [0.0])


def check_study_file(path: Path, create: bool = True, model_identity: str | None = None) -> dict | None:
    """Before any work: a study file that exists must be a readable SQLite database holding the study
    patcher's search wrote (a new path is created by `search`); with `model_identity`, one searched on
    that model. Read with sqlite3 read-only (never optuna: it adds its tables to any SQLite file it
    opens). Returns the study's recorded settings, or None for a new study. Errors name the file."""
    from patcher.io.paths import regular_file

    path = Path(path)
    if not os.path.lexists(path):
        if not create:
            raise PatcherError(path, "no such study file")
        return None
    with open(regular_file(path, "study file"), "rb") as f:  # a FIFO is refused, not read
        head = f.read(16)
    if not head:
        return None  # an empty file: SQLite's empty database, the study is created in it
    if head != b"SQLite format 3\x00":
        raise PatcherError(path, "is not a study database (not an SQLite file); choose a new .db path")
    attrs = _recorded_attrs(path, create)
    if attrs is not None and model_identity is not None and attrs.get("model_identity") != model_identity:
        raise PatcherError(
            path,
            f"is a study of another model ({attrs.get('model')}; path, file sizes or times differ): "
            "choose a new --study file for this model",
        )
    return attrs


def _recorded_attrs(path: Path, create: bool) -> dict | None:
    """The 'patcher' attribute of the study in `path`; None for optuna's tables without a study yet (a
    first run interrupted while creating it) when the study may be created."""
    import sqlite3
    from urllib.parse import quote

    try:
        with sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("select name from sqlite_master where type = 'table'")}
            if not {"studies", "study_user_attributes"} <= tables:
                raise PatcherError(
                    path,
                    "is an SQLite database but not an optuna study (no 'studies' table); "
                    "choose a new .db path",
                )
            names = [r[0] for r in db.execute("select study_name from studies")]
            rows = db.execute(
                "select a.value_json from study_user_attributes a join studies s using (study_id) "
                "where s.study_name = ? and a.key = 'patcher'",
                (STUDY_NAME,),
            ).fetchall()
        db.close()
    except sqlite3.Error as e:
        raise PatcherError(path, f"is not a readable study database ({e})") from None
    if STUDY_NAME not in names:
        if names:
            raise PatcherError(
                path,
                f"holds optuna studies ({', '.join(map(repr, names[:5]))}) but not patcher's "
                f"{STUDY_NAME!r}; choose a new .db path",
            )
        if create:
            return None
        raise PatcherError(path, "holds no study yet: its search never completed a trial")
    try:
        attrs = json.loads(rows[0][0]) if rows else None
    except ValueError:
        attrs = None
    if not isinstance(attrs, dict):
        if create and not rows:
            return None  # created, interrupted before its settings were recorded
        raise PatcherError(path, f"holds a study named {STUDY_NAME!r} that patcher did not write")
    return attrs


def open_study(path: Path, attrs: dict | None, seed: int = 0, startup: int = 60, create: bool = True):
    """Create or resume the study at `path`. `attrs` (model, directions, space, evaluation) must match
    what a resumed study recorded: a study is one search, not a mix of several."""
    optuna = _optuna()
    path = Path(path)
    check_study_file(path, create)
    # optuna >= 5 takes constraints from Trial.set_constraint; older versions from constraints_func
    legacy = {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": _constraints}
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=startup, multivariate=True, group=True, seed=seed, **legacy
    )
    try:
        if create:
            study = optuna.create_study(
                storage=storage_url(path),
                study_name=STUDY_NAME,
                load_if_exists=True,
                directions=["minimize", "minimize"],
                sampler=sampler,
            )
        else:  # only read: optuna would create its tables (and a study) in any SQLite file it opens
            study = optuna.load_study(
                storage=storage_url(path, read_only=True), study_name=STUDY_NAME, sampler=sampler
            )
    except Exception as e:
        cause = getattr(e, "orig", None) or e  # SQLAlchemy wraps the driver's error in SQL and a URL
        raise PatcherError(path, f"cannot open the study ({str(cause).splitlines()[0][:200]})") from None
    if attrs is not None:
        old = study.user_attrs.get("patcher")
        if old is None:
            study.set_metric_names(metric_names(objective_of(attrs)))
            study.set_user_attr("patcher", attrs)
        else:
            for key in ("model_identity", "directions_sha256", "space", "evaluation"):
                if json.dumps(old.get(key), sort_keys=True) != json.dumps(attrs.get(key), sort_keys=True):
                    raise PatcherError(
                        path,
                        f"this study was run with a different {key.replace('_', ' ')}; "
                        f"use a new --study file (or the original settings) to resume",
                    )
    return study


def study_attrs(study, path: Path) -> dict:
    attrs = study.user_attrs.get("patcher")
    if not isinstance(attrs, dict):
        raise PatcherError(path, "is not a patcher search study (no 'patcher' user attribute)")
    return attrs


def completed(study) -> list:
    optuna = _optuna()
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def pruned_trials(study) -> list:
    optuna = _optuna()
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.PRUNED]


def pruned() -> Exception:
    """What a trial raises when it is given up (optuna records it as PRUNED; TPE ranks it low)."""
    return _optuna().TrialPruned()


def feasible(trial) -> bool:
    return all(c <= 0 for c in _constraints(trial))


def pareto(trials: list) -> list:
    """Non-dominated feasible trials, by marker rate then KL."""
    pool = [t for t in trials if feasible(t)]
    front = [
        t
        for t in pool
        if not any(
            o.values[0] <= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in pool
        )
    ]
    return sorted(front, key=lambda t: (t.values[0], t.values[1], t.number))


def digest(study) -> str:
    """Identifies the study's evidence: sha256 over its settings and every completed trial."""
    rows = [{"n": t.number, "params": t.params, "values": t.values} for t in completed(study)]
    blob = json.dumps({"attrs": study.user_attrs.get("patcher"), "trials": rows}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Outcome:
    ran: int
    interrupted: bool


def optimize(
    study, run_trial, n_trials: int, timeout_s: float | None, jobs: int = 1, on_trial=None
) -> Outcome:
    """Run trials until the study holds n_trials finished ones, completed or pruned (a resumed study
    continues), or the timeout. `run_trial(trial) -> (marker_rate, kl)`, or it raises pruned().
    Ctrl-C ends the current trial as failed and keeps every finished one (each is committed to
    SQLite as it ends)."""
    remaining = max(n_trials - len(completed(study)) - len(pruned_trials(study)), 0)
    if remaining == 0:
        return Outcome(0, False)
    ran = [0]

    def objective(trial):
        try:
            values = run_trial(trial)
        except _optuna().TrialPruned:
            ran[0] += 1
            raise
        except BaseException as e:
            if isinstance(e, (Exception, KeyboardInterrupt)):
                raise
            raise KeyboardInterrupt from e  # the CLI's Interrupted: optuna records the trial as failed
        ran[0] += 1
        return values

    callbacks = [lambda s, t: on_trial(t)] if on_trial else None
    try:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=timeout_s,
            n_jobs=jobs,
            callbacks=callbacks,
            gc_after_trial=False,
            show_progress_bar=False,
        )
    except KeyboardInterrupt:
        return Outcome(ran[0], True)
    return Outcome(ran[0], False)


def base_attrs(**kw) -> dict:
    return {"patcher": __version__, **kw}
