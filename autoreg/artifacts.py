"""Files that show a trial's result, stored with Optuna's artifact API so that optuna-dashboard shows them.

Every completed trial that improves on the study's best so far gets, per pair: its transform (``.tfm``, fixed to
moving points), a PNG of fixed against warped moving (checkerboard and colour overlay; 3D: three orthogonal slices
through the landmarks' centre) and, with landmarks, the per-landmark TRE before and after as CSV. The store is a
folder inside the study's folder (``studies/<name>/artifacts``); ``autoreg dashboard`` serves the same folder.

Artifacts are uploaded while the trial is still running (Optuna refuses to change a finished trial), so the worker
calls :meth:`ArtifactRecorder.record_if_improved` just before ``study.tell``. Storing them never fails a trial.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import optuna
import SimpleITK as sitk
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.trial import FrozenTrial, TrialState

from .data import PairData
from .images import comparison_png
from .scoring import per_point_tre

log = logging.getLogger(__name__)

ARTIFACT_DIR_NAME = "artifacts"
TRANSFORM_PREFIX = "transform-"
ALIGNMENT_PREFIX = "alignment-"
TRE_PREFIX = "tre-"


def artifact_dir(study_directory: str | Path) -> Path:
    """Where a study's artifacts live: ``<study dir>/artifacts``."""
    return Path(study_directory) / ARTIFACT_DIR_NAME


def artifact_store(study_directory: str | Path) -> FileSystemArtifactStore:
    """The study's artifact store (the folder is created), shared by the workers, the dashboard and the report."""
    folder = artifact_dir(study_directory)
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=folder)


def safe_name(name: str) -> str:
    """A pair name as a file-name fragment (letters, digits, ``_ - .``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "pair"


def tre_rows(pair: PairData, transform: sitk.Transform) -> list[dict[str, float | int | str]]:
    """Per landmark (numbered as in its files): its fixed and moving coordinates, TRE before (identity) and after
    ``transform``, and, where the study split the landmarks, whether it selected or only reports (``set``)."""
    if pair.fixed_points is None or pair.moving_points is None:
        return []
    fixed, moving, sets = pair.fixed_points, pair.moving_points, ["select"] * len(pair.fixed_points)
    numbers = list(range(1, len(fixed) + 1))
    if pair.report_rows is not None:
        n = len(fixed) + len(pair.report_rows)
        report = set(int(r) for r in pair.report_rows)
        numbers = [r + 1 for r in range(n) if r not in report] + [int(r) + 1 for r in pair.report_rows]
        fixed = np.vstack([fixed, pair.report_fixed_points])
        moving = np.vstack([moving, pair.report_moving_points])
        sets += ["report"] * len(pair.report_rows)
    identity = sitk.Transform(pair.dim, sitk.sitkIdentity)
    before = per_point_tre(identity, fixed, moving)
    after = per_point_tre(transform, fixed, moving)
    axes = "xyz"[: pair.dim]
    rows = []
    for number, fp, mp, b, a, which in zip(numbers, fixed, moving, before, after, sets):
        row: dict[str, float | int | str] = {"landmark": number}
        row.update({f"fixed_{c}": float(v) for c, v in zip(axes, fp)})
        row.update({f"moving_{c}": float(v) for c, v in zip(axes, mp)})
        row.update({"tre_before": float(b), "tre_after": float(a)})
        if pair.report_rows is not None:
            row["set"] = which
        rows.append(row)
    return sorted(rows, key=lambda r: r["landmark"])


def write_tre_csv(path: Path, rows: list[dict[str, float | int]]) -> None:
    """The rows of :func:`tre_rows` as CSV with a header."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_trial_files(folder: Path, pairs: Iterable[PairData], transforms: Mapping[str, sitk.Transform]) -> list[Path]:
    """Write each pair's transform, alignment PNG and TRE CSV into ``folder``; returns the files written."""
    files: list[Path] = []
    for pair in pairs:
        tx = transforms.get(pair.name)
        if tx is None:
            continue
        stem = safe_name(pair.name)
        tfm = folder / f"{TRANSFORM_PREFIX}{stem}.tfm"
        sitk.WriteTransform(tx, str(tfm))
        files.append(tfm)
        png = folder / f"{ALIGNMENT_PREFIX}{stem}.png"
        png.write_bytes(comparison_png(pair.fixed, pair.moving, tx, pair.every_fixed_point))
        files.append(png)
        rows = tre_rows(pair, tx)
        if rows:
            path = folder / f"{TRE_PREFIX}{stem}.csv"
            write_tre_csv(path, rows)
            files.append(path)
    return files


def best_complete_value(study: optuna.Study, *, exclude: int | None = None) -> float | None:
    """The lowest finite value among the study's COMPLETE trials (other than trial ``exclude``)."""
    values = [
        t.value
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.number != exclude and t.value is not None and math.isfinite(t.value)
    ]
    return min(values) if values else None


def improves(study: optuna.Study, trial_number: int, value: float) -> bool:
    """Whether ``value`` beats every other completed trial (minimisation); the first finite value always does."""
    if value is None or not math.isfinite(value):
        return False
    best = best_complete_value(study, exclude=trial_number)
    return best is None or value < best


class ArtifactRecorder:
    """Uploads a trial's pictures, transforms and TRE tables to the study's artifact store when it improves."""

    def __init__(self, study_directory: str | Path):
        self.study_directory = Path(study_directory)
        self._store: FileSystemArtifactStore | None = None

    @property
    def store(self) -> FileSystemArtifactStore:
        if self._store is None:
            self._store = artifact_store(self.study_directory)
        return self._store

    def record(
        self, trial: optuna.Trial, pairs: Iterable[PairData], transforms: Mapping[str, sitk.Transform]
    ) -> list[str]:
        """Upload the files of a running trial; returns the artifact ids."""
        ids = []
        with tempfile.TemporaryDirectory(prefix="autoreg-artifacts-") as tmp:
            for path in write_trial_files(Path(tmp), pairs, transforms):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    ids.append(upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial))
        return ids

    def record_if_improved(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        value: float | None,
        pairs: Iterable[PairData],
        transforms: Mapping[str, sitk.Transform],
    ) -> list[str]:
        """Call before ``study.tell(trial, value)``: uploads only when ``value`` beats the best so far. Raises only
        when the study's storage stopped answering (``tell`` would fail the same way, and says it in one line)."""
        from .study import storage_errors

        try:
            if value is None or not transforms or not improves(study, trial.number, value):
                return []
            ids = self.record(trial, pairs, transforms)
            log.info("trial %d improved to %.4g: stored %d artifact(s)", trial.number, value, len(ids))
            return ids
        except storage_errors():
            raise
        except Exception as err:  # noqa: BLE001 - pictures are a nicety: the trial's result must still be told
            log.warning("trial %d: could not store artifacts (%s: %s)", trial.number, type(err).__name__, err)
            return []


def trial_artifacts(study: optuna.Study, trial: FrozenTrial) -> dict[str, str]:
    """File name -> artifact id of a finished trial's artifacts (the newest upload of each name wins)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        metas = get_all_artifact_meta(trial, storage=study._storage)  # noqa: SLF001 - FrozenTrial needs the storage
    return {m.filename: m.artifact_id for m in metas}


def load_transform(
    study: optuna.Study, trial: FrozenTrial, pair_name: str, store: FileSystemArtifactStore
) -> sitk.Transform | None:
    """A trial's stored transform for one pair, or None when it has none (not an improving trial, or files gone)."""
    artifact_id = trial_artifacts(study, trial).get(f"{TRANSFORM_PREFIX}{safe_name(pair_name)}.tfm")
    if artifact_id is None:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="autoreg-artifacts-") as tmp:
            path = Path(tmp) / "t.tfm"
            with store.open_reader(artifact_id) as reader:
                path.write_bytes(reader.read())
            return sitk.ReadTransform(str(path))
    except Exception as err:  # noqa: BLE001 - a missing or unreadable file: the caller registers again
        log.info("trial %d: stored transform of %s unusable (%s)", trial.number, pair_name, err)
        return None


__all__ = [
    "ARTIFACT_DIR_NAME",
    "ArtifactRecorder",
    "artifact_dir",
    "artifact_store",
    "best_complete_value",
    "improves",
    "load_transform",
    "trial_artifacts",
    "tre_rows",
    "write_trial_files",
]
