"""Study storage and lifecycle: where a study lives, creating or resuming it, its sampler and pruner, the baseline
and user recipes enqueued first, trials left RUNNING by dead workers failed and retried.

Storage is named by a string that travels to worker processes (never a storage object):

* default: ``JournalStorage(JournalFileBackend(<study dir>/journal.log))``, a file that many local processes share
  safely (SQLite is not: enqueued trials and simultaneous starts crashed parallel workers with "Cannot tell a
  COMPLETE trial");
* ``--storage URL``: ``postgresql://...``/``mysql://...`` (RDB, with heartbeats: a killed worker's trial is failed and
  retried by Optuna), ``sqlite:///...`` (one process only), ``redis://...`` (journal), or a path to a journal file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from .config import StudyConfig
from .cost import CostModel
from .errors import UserError, excerpt
from .objective import RUNGS
from .processes import pid_alive
from .recipe import recipe_to_dict
from .space import SearchSpace
from .trial import (
    BASELINE,
    SUGGESTED,
    USER_PREFIX,
    TrialRecord,
    attrs,
    best_and_baseline,
    crossed_from,
    crossed_role,
    interrupted_numbers,
    not_run_numbers,
    read,
    records,
    write_to_storage,
)

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.log"
HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 120


class FlockJournalLock:
    """The journal's inter-process lock as an ``fcntl.flock``: the kernel releases it when its holder dies, so a
    worker killed while writing never leaves a stale lock file behind (Optuna's file locks wait 30 s for that).
    Duck-typed to Optuna's ``BaseJournalFileLock`` (``acquire``/``release``)."""

    def __init__(self, path: Path):
        self.path = str(path)
        self._fh = None

    def acquire(self, blocking: bool = True) -> bool:
        import fcntl

        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        self._fh = fh
        return True

    def release(self) -> None:
        import fcntl

        fh, self._fh = self._fh, None
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


#: What a torn record is read as: a study attribute set on no study (Optuna's replay skips it), so that the
#: journal's line numbers and the storage's count of records read stay the same in every process.
_NO_OP_RECORD = {"op_code": 2, "worker_id": "autoreg:torn-record", "study_id": -1, "user_attr": {}}
#: Where a record starts: json.dumps of Optuna's records with separators (",", ":").
_RECORD_START = b'{"op_code":'
_warned_torn: set[tuple[str, int]] = set()


class RepairingJournalFileBackend(JournalFileBackend):
    """Optuna's journal file, robust to a record torn by a writer that died in the middle of an append.

    Optuna reads a torn last line as "being written" and skips it; the next append then continues that line, and
    from then on every read fails. Here an append that finds an unterminated last line (under the journal lock, so
    no writer is mid-write) starts on a new line; a reader that can take the lock at once closes such a line itself;
    and a line that is not a record is read as a no-op with a warning (a whole record glued onto a torn one by an
    older autoreg is recovered). Only ``read_logs`` and ``append_logs`` differ from Optuna 5's JournalFileBackend.
    """

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        self._close_torn_tail(wait=False)
        with open(self._file_path, "rb") as f:
            remaining = os.fstat(f.fileno()).st_size  # what another process appends meanwhile is read next time
            start = 0
            if log_number_from in self._log_number_offset:
                f.seek(self._log_number_offset[log_number_from])
                start = log_number_from
                remaining -= self._log_number_offset[log_number_from]
            for number, line in enumerate(f, start=start):
                remaining -= len(line)
                if remaining < 0 or not line.endswith(b"\n"):
                    break  # being written now (or torn, and closed by the next append)
                self._log_number_offset.setdefault(number + 1, self._log_number_offset[number] + len(line))
                if number >= log_number_from:
                    yield self._decode(line, number)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in logs).encode("utf-8")
        self._lock.acquire()
        try:
            if not self._ends_cleanly():
                self._warn_torn(self._count_lines(), "closed it and appended after it")
                text = b"\n" + text
            with open(self._file_path, "ab") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._lock.release()

    def _decode(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
            if isinstance(record, dict) and "op_code" in record:
                return record
        except ValueError:  # JSONDecodeError, or a torn multi-byte character
            pass
        glued = line.rfind(_RECORD_START)
        if glued > 0:
            try:
                record = json.loads(line[glued:])
                if isinstance(record, dict) and "op_code" in record:
                    self._warn_torn(number, "skipped it and kept the record written after it on the same line")
                    return record
            except ValueError:
                pass
        self._warn_torn(number, "skipped it")
        return dict(_NO_OP_RECORD)

    def _warn_torn(self, number: int, what: str) -> None:
        if (self._file_path, number) not in _warned_torn:
            _warned_torn.add((self._file_path, number))
            log.warning(
                "journal %s: line %d holds a torn record (a process died while writing it); %s",
                self._file_path,
                number + 1,
                what,
            )

    def _ends_cleanly(self) -> bool:
        with open(self._file_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return True
            f.seek(size - 1)
            return f.read(1) == b"\n"

    def _count_lines(self) -> int:
        """The 0-based number of the file's last line."""
        with open(self._file_path, "rb") as f:
            return sum(1 for _ in f) - 1

    def _close_torn_tail(self, *, wait: bool) -> None:
        """End an unterminated last line with a newline if no writer holds the lock (so nobody is writing it)."""
        if self._ends_cleanly() or not isinstance(self._lock, FlockJournalLock):
            return
        if not self._lock.acquire(blocking=wait):
            return
        try:
            if not self._ends_cleanly():
                with open(self._file_path, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                self._warn_torn(self._count_lines(), "closed it")
        except OSError as err:  # a read-only journal: read it as it is
            log.debug("cannot close the torn last line of %s: %s", self._file_path, err)
        finally:
            self._lock.release()


def journal_lock(journal: Path):
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - Windows: Optuna's own lock
        return None
    return FlockJournalLock(journal.with_name(journal.name + ".flock"))


class TuneLock:
    """Held (shared) by every ``autoreg tune`` of a study on this machine for its whole run; whoever gets it
    exclusively at start knows no other tune runs, so every RUNNING trial it finds is stale."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "tune.lock"
        self._fh = None

    def __enter__(self) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return False
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except OSError:
            alone = False
        fcntl.flock(self._fh, fcntl.LOCK_SH)
        return alone

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()


STUDIES_FOLDER = "studies"


def default_study_dir(cfg: StudyConfig) -> Path:
    """``studies/<name>`` beside PAIR.yaml: found the same from any working directory."""
    return cfg.path.parent / STUDIES_FOLDER / cfg.name


def study_dir(cfg: StudyConfig, override: str | Path | None = None) -> Path:
    """``--study-dir``, or the default beside PAIR.yaml. A study that an older autoreg kept in ``studies/<name>``
    of the working directory (for this same PAIR.yaml) is still used there, with a warning."""
    if override:
        return Path(override)
    default = default_study_dir(cfg)
    legacy = Path.cwd() / STUDIES_FOLDER / cfg.name
    if not (default / JOURNAL_NAME).exists() and (legacy / JOURNAL_NAME).exists() and legacy != default:
        try:
            recorded = json.loads((legacy / "study.json").read_text(encoding="utf-8")).get("pair_file")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded == str(cfg.path):
            log.warning(
                "using the study in %s (the old default, beside the working directory); move it to %s or "
                "pass --study-dir",
                legacy,
                default,
            )
            return legacy
    return default


@dataclass(frozen=True)
class StorageSpec:
    """A storage as a picklable string, and whether it is this machine's default journal file."""

    url: str = field(repr=False)  # may hold a password: shown only through ``display``
    local_journal: bool = False

    @property
    def display(self) -> str:
        return redact(self.url)


def storage_errors() -> tuple[type[BaseException], ...]:
    """The errors a database storage raises when it stops answering (Optuna's and its driver's)."""
    try:
        from sqlalchemy.exc import DBAPIError
    except ImportError:  # pragma: no cover - SQLAlchemy comes with Optuna's RDB storage
        return (optuna.exceptions.StorageInternalError,)
    return (optuna.exceptions.StorageInternalError, DBAPIError)


def storage_lost(err: BaseException, spec: StorageSpec) -> BaseException:
    """A database that stopped answering mid-study, as one line (passwords hidden); any other error unchanged."""
    kinds = storage_errors()
    if spec.local_journal or not isinstance(err, kinds):
        return err
    cause = err
    while isinstance(cause.__cause__, kinds):  # Optuna wraps the driver's error, which says what happened
        cause = cause.__cause__
    why = str(cause).strip().splitlines()[0] if str(cause).strip() else "no detail"
    return UserError(
        f"the study's storage {spec.display} stopped answering ({type(cause).__name__}: "
        f"{excerpt(redact(why, spec.url), 200, quote=False)}); every finished trial is kept: run the same command "
        "again to resume once it answers",
        key="--storage",
    )


def storage_spec(cfg: StudyConfig, directory: Path, url: str | None) -> StorageSpec:
    if url:
        return StorageSpec(url, local_journal=not _is_url(url))
    return StorageSpec(str((directory / JOURNAL_NAME).resolve()), local_journal=True)


def _is_url(text: str) -> bool:
    return "://" in text


#: A URL inside any text: scheme://... up to white space or a quote.
_URL_IN_TEXT = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'\"<>`]*)")
#: Query parameters whose value is a secret (password=, sslpassword=, token=, api_key=...).
_SECRET_PARAM = re.compile(r"([?&;])([^=&;#]*(?:pass|pwd|secret|token|key|auth|cred)[^=&;#]*)=([^&;#]*)", re.I)
_MASK = "***"


def redact(text: str, url: str | None = None) -> str:
    """``text`` with the password of every URL in it hidden, safe to print or store: the password of the userinfo
    (``user:pw@``, even with ``@`` inside ``pw``) and secret query parameters (``?password=``). With ``url``, every
    literal occurrence of that URL's secrets is hidden too (a driver's message may quote a password alone).
    The one place where autoreg hides passwords: messages, ``study.json`` and exported recipes all go through it."""
    shown = _URL_IN_TEXT.sub(lambda m: m.group(1) + _redact_rest(m.group(2)), text)
    for secret in sorted(_secrets_of(url), key=len, reverse=True) if url else ():
        shown = shown.replace(secret, _MASK)
    return shown


def _redact_rest(rest: str) -> str:
    """What follows ``scheme://``: secret query values masked first, then everything of the userinfo after the
    user name, up to the last ``@`` (a password may hold ``@``; masking too much is the safe side)."""
    rest = _SECRET_PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}={_MASK}", rest)
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return rest
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return rest  # a user name alone (or an '@' in a path): nothing secret
    return f"{user}:{_MASK}@{host}"


def _secrets_of(url: str) -> set[str]:
    """The secrets a URL holds, as written and percent-decoded (only those long enough to find safely)."""
    from urllib.parse import unquote

    if not _is_url(url):
        return set()
    rest = url.partition("://")[2]
    found = [m.group(3) for m in _SECRET_PARAM.finditer(rest)]
    userinfo, at, _ = _SECRET_PARAM.sub("", rest).rpartition("@")
    if at and ":" in userinfo:
        password = userinfo.partition(":")[2]
        found.append(password)
    found += [unquote(v) for v in found]
    found += [piece for v in found for piece in v.split("@")]  # as a parser that stops at an '@' would cut it
    return {v for v in found if len(v) >= 3 and v != _MASK}


def open_storage(spec: StorageSpec) -> optuna.storages.BaseStorage:
    """Build the storage in this process (workers call it themselves)."""
    url = spec.url
    try:
        if url.startswith(("postgresql", "mysql", "sqlite", "oracle", "mssql")):
            heartbeat = not url.startswith("sqlite")
            with warnings.catch_warnings():  # heartbeats are 'experimental' in Optuna 5 but the documented way
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S if heartbeat else None,
                    grace_period=GRACE_PERIOD_S if heartbeat else None,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1) if heartbeat else None,
                )
        if url.startswith("redis://"):
            from optuna.storages.journal import JournalRedisBackend

            with warnings.catch_warnings():  # 'experimental' since Optuna 3.1, and the documented way
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return JournalStorage(JournalRedisBackend(url))
        if _is_url(url):
            raise UserError(
                f"unsupported storage URL scheme (got {excerpt(redact(url), quote=False)})", key="--storage"
            )
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(RepairingJournalFileBackend(str(path), lock_obj=journal_lock(path)))
    except UserError:
        raise
    except ImportError as err:  # SQLAlchemy's missing DB-API module is the cause of Optuna's ImportError
        driver = getattr(err.__cause__, "name", None) or err.name or "its database driver"
        hint = "; pip install 'autoreg[postgres]'" if url.startswith("postgresql") else ""
        raise UserError(
            f"storage {redact(url)} needs {driver}, which is not installed{hint}", key="--storage"
        ) from None
    except Exception as err:  # noqa: BLE001 - connection refused, bad credentials, a folder that cannot be made...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot open storage {redact(url)} ({excerpt(redact(msg, url), 200, quote=False)})",
            key="--study-dir" if spec.local_journal else "--storage",  # the default journal lives in the study folder
        ) from None


def make_sampler(seed: int, worker: int, launch: int = 0) -> optuna.samplers.BaseSampler:
    """TPE over the conditional space; the constant liar keeps parallel workers from proposing the same point.

    Each worker of each ``autoreg tune`` of a study draws its own stream: the sampler's seed comes from the study
    seed, the launch number (``take_launch_number``) and the worker. Two tunes started together on one study
    therefore never replay each other's proposals, a resumed study does not replay its random start-up points, and
    one process alone on a new study is reproducible."""
    digest = hashlib.sha256(f"{seed}:{launch}:{worker}".encode()).digest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=int.from_bytes(digest[:4], "big") % (2**31 - 1),
            n_startup_trials=10,
            multivariate=True,
            group=True,
            constant_liar=True,
        )


LAUNCHES_ATTR = "launches"


def take_launch_number(study: optuna.Study) -> int:
    """This tune's number among the tunes of the study (0 for the first), counted in the study itself. The caller
    holds the study's budget lock, so that two tunes started together on this machine get different numbers."""
    launch = int(study.user_attrs.get(LAUNCHES_ATTR, 0))
    study.set_user_attr(LAUNCHES_ATTR, launch + 1)
    return launch


class RungPruner(optuna.pruners.BasePruner):
    """Screening over pyramid levels: at each report step a trial goes on only while its value is among the best
    ``keep`` fraction of the values other finished trials reported at the same step, once ``n_startup`` did.

    Steps are ``objective.report_step``s, so the rung (coarsest level, before the finest level, stage end) is the
    step modulo ``len(RUNGS)``: cheap coarse levels decide which trials earn the expensive full-resolution ones."""

    def __init__(self, keep: tuple[float, ...] = (0.75, 0.5, 0.5), n_startup: int = 8):
        self.keep = keep
        self.n_startup = n_startup

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        others = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if step in t.intermediate_values and t.number != trial.number
        ]
        if len(others) < self.n_startup:
            return False
        return value > float(np.quantile(others, self.keep[step % len(RUNGS)]))


def make_pruner(enabled: bool, n_pairs: int = 1) -> optuna.pruners.BasePruner:
    """One pair: screen trials level by level (``RungPruner``). Several pairs: Optuna's ``WilcoxonPruner`` with the
    pairs as its instances (a trial stops once it is significantly worse than the best on the pairs it has done)."""
    if not enabled:
        return optuna.pruners.NopPruner()
    if n_pairs > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2)
    return RungPruner()


IDENTITY_ATTR = "identity"


def objective_identity(cfg: StudyConfig) -> dict[str, Any]:
    """What a trial's score means: the metric and how repeats and penalties fold into it."""
    o = cfg.objective
    return {
        "metric": "tre_mean" if cfg.uses_landmarks else "holdout_loss",
        "aggregate": o.aggregate,
        "std_weight": o.std_weight,
        "folding_penalty": o.folding_penalty,
    }


def study_identity(cfg: StudyConfig) -> dict[str, Any]:
    """What a study's trials are comparable on: per pair the digests of its images, landmarks and masks, the
    stages and the objective. A study resumed with other inputs would mix trials of different problems."""
    pairs = {}
    for spec in cfg.pairs:
        files = {
            "fixed": spec.fixed,
            "moving": spec.moving,
            "landmarks.fixed": spec.fixed_landmarks,
            "landmarks.moving": spec.moving_landmarks,
            "masks.fixed": spec.fixed_mask,
            "masks.moving": spec.moving_mask,
        }
        pairs[spec.name] = {k: _digest(path) for k, path in files.items() if path is not None}
    return {"stages": list(cfg.stages), "objective": objective_identity(cfg), "pairs": pairs}


def _digest(path: Path) -> str | None:
    """``data.file_digest`` of a file (None if it cannot be read now); of a folder (a DICOM series), the digest of
    its files' names and digests."""
    path = Path(path)
    try:
        if path.is_dir():
            import hashlib

            parts = [f"{p.relative_to(path)}:{_cached_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
            return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
        return _cached_digest(path)
    except OSError:
        return None


def _cached_digest(path: Path) -> str:
    st = path.stat()
    return _digest_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:  # noqa: ARG001 - size and mtime key the cache
    from .data import file_digest

    return file_digest(Path(path))


def identity_change(recorded: dict[str, Any], current: dict[str, Any], cfg: StudyConfig) -> tuple[str, str] | None:
    """The first difference between a study's recorded identity and the current one: (key, what changed)."""
    if list(recorded.get("stages", [])) != current["stages"]:
        return "stages", f"stages were {recorded.get('stages')}, now {current['stages']}"
    old_obj, new_obj = recorded.get("objective", {}), current["objective"]
    for k, v in new_obj.items():
        if k in old_obj and old_obj[k] != v:
            return "objective", f"objective {k} was {old_obj[k]!r}, now {v!r}"
    old_pairs, new_pairs = recorded.get("pairs", {}), current["pairs"]
    specs = {s.name: s for s in cfg.pairs}
    for name, files in new_pairs.items():
        spec = specs[name]
        if name not in old_pairs:
            return spec.key_of("name") if spec.key else "fixed", f"pair '{name}' was not in the study"
        for k in sorted(set(files) | set(old_pairs[name])):
            if k in files and files[k] is None:
                continue  # unreadable now (export after the data moved): not a change autoreg can see
            if files.get(k) != old_pairs[name].get(k):
                what = "was added" if k not in old_pairs[name] else "was removed" if k not in files else "changed"
                return spec.key_of(k), f"pair '{name}': the {k.replace('.', ' ')} file {what} since the study began"
    gone = sorted(set(old_pairs) - set(new_pairs))
    if gone:
        return "pairs", f"pair '{gone[0]}' of the study is no longer in the file"
    return None


def check_identity(study: optuna.Study, cfg: StudyConfig, *, record: bool = False) -> None:
    """Refuse a study whose inputs changed since it was created. A study made before identities were recorded
    has its stages checked, and with ``record`` (a resuming tune) gets the current identity."""
    current = study_identity(cfg)
    recorded = study.user_attrs.get(IDENTITY_ATTR)
    if recorded is None:
        stages = study.user_attrs.get("stages")
        recorded = {"stages": stages} if stages is not None else {}
        if list(recorded.get("stages", current["stages"])) == current["stages"]:
            if record:
                study.set_user_attr(IDENTITY_ATTR, current)
            return
    change = identity_change(recorded, current, cfg)
    if change is not None:
        key, what = change
        raise UserError(
            f"the study '{cfg.name}' was made with other inputs ({what}); to tune on these, start a new study: "
            f"another 'name:' in {cfg.path.name}, or --study-dir",
            file=cfg.path,
            key=key,
        )


def create_or_load(
    cfg: StudyConfig, spec: StorageSpec, space: SearchSpace, fingerprint: dict[str, Any], starting: Sequence[Any] = ()
) -> optuna.Study:
    """Create the study (enqueueing the default recipe, then the ``starting`` points: the user's recipes and warm
    starts, then the default recipe's points in the space) or load it to continue on the same inputs (queueing
    starting points it has not seen yet)."""
    storage = open_storage(spec)
    pruner = make_pruner(cfg.prune, len(cfg.pairs))
    try:
        study = optuna.load_study(study_name=cfg.name, storage=storage, pruner=pruner)
        created = False
    except KeyError:
        try:
            study = optuna.create_study(study_name=cfg.name, storage=storage, direction="minimize", pruner=pruner)
            created = True
        except optuna.exceptions.DuplicatedStudyError:  # another tune created it just now
            study = optuna.load_study(study_name=cfg.name, storage=storage, pruner=pruner)
            created = False
    if created:
        study.set_user_attr(IDENTITY_ATTR, study_identity(cfg))
        study.set_user_attr("pair_file", str(cfg.path))
        study.set_user_attr("stages", list(cfg.stages))
        study.set_user_attr("objective", cfg.score_name)
        study.set_user_attr("seed", cfg.seed)
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("created", datetime.now(UTC).isoformat(timespec="seconds"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([cfg.score_name])
        baseline = space.baseline_recipe(seed=cfg.seed)
        study.enqueue_trial({}, user_attrs=attrs(recipe=recipe_to_dict(baseline), role=BASELINE))
    else:
        check_identity(study, cfg, record=True)
    seen = {t.role for t in records(study)}
    for point in starting:
        if point.role in seen:
            continue
        if point.params is None:  # a user's recipe runs as it is, recording no point of the space
            study.enqueue_trial({}, user_attrs=attrs(recipe=recipe_to_dict(point.recipe), role=point.role))
        else:  # a warm start: the sampler sees (and learns from) its point
            study.enqueue_trial(point.params, user_attrs=attrs(role=point.role), skip_if_exists=True)
    for role, params in space.default_points():
        if role not in seen:
            study.enqueue_trial(params, user_attrs=attrs(role=role), skip_if_exists=True)
    return study


#: Shares of the trial budget after which the default deformable ways run again on the best trial's linear stages
#: (every ``CROSS_EVERY`` finished trials, as often, when the study has no count).
CROSS_AT = (1 / 3, 2 / 3)
CROSS_EVERY = 20


def cross_defaults_if_due(
    study: optuna.Study,
    space: SearchSpace,
    trials: Sequence[FrozenTrial],
    n_trials: int | None,
    linear_step: int | None = None,
) -> list[str]:
    """Under the budget lock: once a share of the budget has finished, queue each default deformable way on the best
    linear stages so far (``crossing_donor``, ``SearchSpace.crossed_points``); returns the roles queued.

    The default points run on the SimpleITK default affine, 19-73 px off on three of the four histology pairs, so a
    way's default met a good affine only by chance; crossed onto the best linear stages, the ways won 30 of 32
    60-trial histology studies of eight runs, with sums over the pairs of 28.5-30.6 px against 31.1-35.6 without
    crossing (``benchmarks/deformable.py``)."""
    if space.first_deformable() is None:
        return []
    finished, marks = _finished_and_marks(trials, n_trials)
    crossed = {n for t in trials if (n := crossed_from(read(t, "role") or SUGGESTED)[1]) is not None}
    if len(crossed) >= sum(finished >= m for m in marks):  # on every ask: decided before reading any record
        return []
    records_ = [TrialRecord.of(t) for t in trials]
    donor = crossing_donor(records_, linear_step)
    if donor is None or str(donor.number) in crossed:
        return []
    # a way whose own default point ran out of its time limit does not fit this study's budget (the symmetric field
    # and Demons on mmdef3d, 182x218x182: 60 s each, stopped in the field), crossed or not
    too_slow = {crossed_from(r.role)[0] for r in records_ if r.out_of_time}
    queued = []
    for role, params in space.crossed_points(donor.params):
        if role in too_slow or role == donor.role:  # a way's default point as donor: crossed, it would repeat itself
            continue
        name = crossed_role(role, donor.number)
        study.enqueue_trial(params, user_attrs=attrs(role=name), skip_if_exists=True)
        queued.append(name)
    return queued


def _finished_and_marks(trials: Sequence[FrozenTrial], n_trials: int | None) -> tuple[int, list[int]]:
    """How many trials have finished, as the budget counts them (a share of the registrations run), and the counts
    at which the default ways are crossed (``CROSS_AT``)."""
    skipped = not_run_numbers(trials, n_trials) | interrupted_numbers(trials)
    finished = sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and t.number not in skipped for t in trials
    )
    marks = [max(1, round(f * n_trials)) for f in CROSS_AT] if n_trials else [CROSS_EVERY * (i + 1) for i in range(2)]
    return finished, marks


def condition_on_best_linear(
    study: optuna.Study,
    space: SearchSpace,
    trials: Sequence[FrozenTrial],
    n_trials: int | None,
    linear_step: int | None = None,
) -> int | None:
    """Under the budget lock, before a suggestion: from the first crossing mark on, queue every other suggested
    trial with the best linear stages so far fixed (``crossing_donor``'s parameters, and its seed), so that the
    sampler draws only the first deformable stage; returns the donor's number, or None when none was queued.

    In a two-stage study each suggestion draws its linear stages too, and a poor draw ends the trial in its linear
    stage (pruned or far off) before its field is seen: in a 60-trial mmdef3d study 20 of 54 registrations were
    pruned in their affine stage. Every other suggestion still draws every stage, so the linear stages keep being
    searched."""
    index = space.first_deformable()
    if index is None or any(t.state == TrialState.WAITING for t in trials):
        return None  # queued points run first
    finished, marks = _finished_and_marks(trials, n_trials)
    if finished < marks[0] or len(trials) % 2:  # the trial to be asked is numbered len(trials)
        return None
    donor = crossing_donor([TrialRecord.of(t) for t in trials], linear_step)
    if donor is None:
        return None
    prefix = f"stage{index}."
    linear = {k: v for k, v in donor.params.items() if not k.startswith(prefix)}
    study.enqueue_trial(linear, user_attrs=attrs(linear_from=donor.number))
    return donor.number


def crossing_donor(records_: Sequence[TrialRecord], linear_step: int | None) -> TrialRecord | None:
    """The trial whose linear stages ended best (its value at report step ``linear_step``), whatever its role or
    whether it still runs, for any trial of this space (a crossed one repeats its donor's); where no level was
    reported, the best suggested trial (a default point's affine is the default one).

    The default ways are generic: from the landmarks' own affine the symmetric field beats ANTs SyN on three
    histology pairs (``benchmarks/landmark_floor.py``), so what they need from a donor is its affine. On rat
    kidney, the default symmetric field on the four trials whose linear stages ended best scored 3.86-4.02 px over
    every landmark, against 4.40 on the best trial's (the default affine with its seed)."""
    if linear_step is not None:
        scored = [
            r
            for r in records_
            if r.params
            and crossed_from(r.role)[1] is None
            and r.linear_from is None  # a conditioned suggestion repeats its donor's linear stages
            and r.state in ("COMPLETE", "PRUNED", "RUNNING")  # a running trial's linear stages may have ended
            and np.isfinite(r.intermediate.get(linear_step, np.nan))
        ]
        if scored:
            return min(scored, key=lambda r: (r.intermediate[linear_step], r.number))
    best, _ = best_and_baseline(r for r in records_ if r.role == SUGGESTED and r.linear_from is None)
    return best


def load_existing(cfg: StudyConfig, spec: StorageSpec) -> optuna.Study:
    """The study for export/report/dashboard, on the inputs it was made with; a clear error when it was never
    tuned."""
    if spec.local_journal and not Path(spec.url).exists():
        raise UserError(
            f"no study found: looked for {spec.display}; pass --study-dir DIR (or --storage URL) where the study "
            f"lives, or run 'autoreg tune {cfg.path}' first",
            file=cfg.path,
            key="name",
        )
    storage = open_storage(spec)
    try:
        study = optuna.load_study(study_name=cfg.name, storage=storage)
    except KeyError:
        raise UserError(f"no study named '{cfg.name}' in {spec.display}", file=cfg.path, key="name") from None
    check_identity(study, cfg)
    return study


def reap_stale_trials(study: optuna.Study, *, live_pids: set[int] = frozenset(), alone: bool = False) -> list[int]:
    """Fail RUNNING trials whose worker on this host is gone, and enqueue each again once; returns their numbers.

    Journal storage has no heartbeats, so a killed worker's trial would stay RUNNING forever. RDB storages get
    the same from Optuna's heartbeat and ``RetryHeartbeatStaleTrialCallback`` for workers on other hosts.
    ``alone``: no other ``autoreg tune`` uses
    this study (see ``TuneLock``), so every RUNNING trial is stale, even one killed before it named its worker.
    """
    host = socket.gethostname()
    stale = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        whost, _, pid = (TrialRecord.of(frozen).worker or "").rpartition(":")
        if not alone:
            if whost != host or not pid.isdigit():
                continue
            if int(pid) in live_pids or (pid_alive(int(pid)) and int(pid) != os.getpid()):
                continue
        stale.append(frozen)
    return fail_trials(study, stale)


def running_trials_of(study: optuna.Study, workers: set[str]) -> list[FrozenTrial]:
    """The RUNNING trials whose ``worker`` (host:pid) is one of ``workers``."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get("worker") in workers
    ]


def fail_trials(study: optuna.Study, trials: list[FrozenTrial], *, reason: str | None = None) -> list[int]:
    """Fail trials that their workers can no longer finish; returns their numbers.

    Without ``reason`` the worker died: each trial is queued again once (``retry_of``); a retry whose worker died
    too is failed for good, since a recipe that crashes its worker would otherwise crash every retry (and, with
    loky, the other workers' trials with it). With a ``reason`` (Ctrl-C: ``INTERRUPTED``) nothing is queued now:
    the next tune queues the interrupted points again (``queue_interrupted_again``).
    A trial that finished meanwhile is left as it is."""
    storage = study._storage  # noqa: SLF001 - Optuna has no public call to fail another process's trial
    failed = []
    for frozen in trials:
        t = TrialRecord.of(frozen)
        again = t.retry_of is not None
        why = reason or (
            "worker died again (a retry; not queued again)" if again else "worker died (trial left RUNNING)"
        )
        try:
            write_to_storage(storage, frozen._trial_id, fail_reason=why)  # noqa: SLF001
            storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)  # noqa: SLF001
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its worker finished it after all
        failed.append(t.number)
        if reason is None and not again:
            _queue_again(study, frozen)
    return failed


def queue_interrupted_again(study: optuna.Study) -> list[str]:
    """Under the budget lock, as a tune starts: queue once more every queued point (the baseline, a user's recipe,
    a warm start, a default or crossed point) that an earlier tune's Ctrl-C stopped; returns their roles. They are
    the study's fixed plan: without this, a baseline interrupted once stayed 'fail (interrupted)' for good.
    Interrupted suggestions are not queued: the sampler suggests anew (both give their place in ``--trials``)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    queued = []
    for frozen in trials:
        t = TrialRecord.of(frozen)
        if not t.interrupted or t.role == SUGGESTED or t.number in retried:
            continue
        _queue_again(study, frozen)
        queued.append(t.role)
    return queued


def _queue_again(study: optuna.Study, frozen: FrozenTrial) -> None:
    """Queue a trial that did not finish to run once more as it was (``retry_of`` names it)."""
    t = TrialRecord.of(frozen)
    # a recipe run as it is (the baseline, a user's) runs again as it is; a point of the space (suggested, a warm
    # start, a default point) is replayed from its params, so that the sampler sees the retry too
    if t.role == BASELINE or t.role.startswith(USER_PREFIX):
        again_attrs = attrs(recipe=t.recipe, role=t.role)
    else:
        again_attrs = attrs(role=t.role) if t.role != SUGGESTED else {}
        if t.linear_from is not None:  # a conditioned suggestion: its donor's seed, so its linear stages again
            again_attrs["linear_from"] = t.linear_from
    # a queued point whose worker died before suggesting it has its values only as Optuna's fixed params
    params = {**frozen.system_attrs.get("fixed_params", {}), **t.params}
    study.enqueue_trial(params, user_attrs=attrs(**again_attrs, retry_of=t.number))


@functools.lru_cache(maxsize=4)
def _calibrated(threads: int) -> CostModel:
    """One calibration per process and thread count (a cross-validation's studies share it)."""
    return CostModel.calibrate(threads)


def cost_model(study: optuna.Study, threads: int) -> CostModel:
    """This machine's cost coefficients at ``threads`` ITK threads: measured once per study and machine, kept in the
    study so that every worker on the machine predicts with the same numbers."""
    key = f"{socket.gethostname()}/{threads}"
    known = study.user_attrs.get("cost_models", {})
    if key in known:
        return CostModel(**known[key])
    model = _calibrated(threads)
    study.set_user_attr("cost_models", {**known, key: model.as_dict()})
    log.info("cost model for %s: %s", key, model)
    return model


def best_and_baseline_of(study: optuna.Study) -> tuple[TrialRecord | None, TrialRecord | None]:
    """The study's best and baseline trials as records (see ``trial.best_and_baseline``)."""
    return best_and_baseline(records(study))


def write_study_info(directory: Path, cfg: StudyConfig, spec: StorageSpec, fingerprint: dict[str, Any]) -> None:
    """A small human-readable JSON next to the journal: what this study is, on which data."""
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "name": cfg.name,
        "pair_file": str(cfg.path),
        "directory": str(directory.resolve()),
        "stages": list(cfg.stages),
        "storage": spec.display,
        "objective": cfg.score_name,
        "fingerprint": fingerprint,
    }
    (directory / "study.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
