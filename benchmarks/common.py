"""What every benchmark shares: where ../shared/data is, which stages fit which pair, timing helpers."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUTOREG_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"

#: Stages that fit each pair (issue 3): pure translations are tuned as rigid; histology as affine and
#: affine + bspline; the 3D brains as affine + bspline.
PAIR_STAGES: dict[str, list[list[str]]] = {
    "itk_brain_pd_shift13x17": [["rigid"]],
    "itk_brain_t1_pd_shift13x17": [["rigid"]],
    "birl_ratkidney_he_pancytokeratin": [["affine"], ["affine", "bspline"]],
    "cima_lunglesion3_he_ki67": [["affine"], ["affine", "bspline"]],
    "cima_lunglesion3_he_cd31": [["affine"], ["affine", "bspline"]],
    "birl_lesion_he_prospc": [["affine"], ["affine", "bspline"]],
    "afids_mni152nlin6asym_colin27_t1": [["affine", "bspline"]],
}
HISTOLOGY = [n for n in PAIR_STAGES if n.startswith(("birl_", "cima_"))]


def selected(only: str = "", stages: str = ""):
    """(pair name, stage list) for every pair whose name contains ``only`` and stage list ``stages`` (a+b form)."""
    for name, stage_lists in PAIR_STAGES.items():
        if only not in name:
            continue
        for st in stage_lists:
            if not stages or "+".join(st) == stages:
                yield name, st


def require_shared_data() -> Path:
    """The data folder, or exit 0 with a clear message: benchmarks skip where ../shared/data is absent."""
    if not SHARED_DATA.is_dir():
        print(f"SKIP: {SHARED_DATA} not present (benchmarks need ../shared/data beside the repo)")
        sys.exit(0)
    return SHARED_DATA


def pair_files(name: str) -> dict[str, Path]:
    d = SHARED_DATA / name
    ext = "nii.gz" if (d / "fixed.nii.gz").exists() else "png"
    return {
        "fixed": d / f"fixed.{ext}",
        "moving": d / f"moving.{ext}",
        "fixed_landmarks": d / "fixed_landmarks.csv",
        "moving_landmarks": d / "moving_landmarks.csv",
    }


def write_pair_yaml(folder: Path, name: str, stages: list[str], **extra) -> Path:
    """A PAIR.yaml for one shared pair (absolute paths), so a benchmark can tune it from anywhere."""
    import yaml

    files = pair_files(name)
    doc = {
        "name": f"{name}-{'-'.join(stages)}",
        "fixed": str(files["fixed"]),
        "moving": str(files["moving"]),
        "landmarks": {"fixed": str(files["fixed_landmarks"]), "moving": str(files["moving_landmarks"])},
        "stages": stages,
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def tune(pair: Path, study_dir: Path, trials: int, jobs: int, *extra: str, check: bool = True):
    """``autoreg tune PAIR --trials N --jobs J --seed 0 --study-dir DIR -q [extra]`` in a subprocess; returns the
    completed process and its wall seconds (a failure raises unless ``check`` is false)."""
    import subprocess
    import time

    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoreg.cli",
            "tune",
            str(pair),
            "--trials",
            str(trials),
            "--jobs",
            str(jobs),
            "--seed",
            "0",
            "--study-dir",
            str(study_dir),
            "-q",
            *extra,
        ],
        check=check,
        capture_output=True,
        text=True,
    )
    return proc, time.perf_counter() - t0


def machine() -> str:
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def saved_results(path: Path) -> dict:
    """A benchmark's saved results by pair (empty before its first run): each run replaces only the pairs it ran."""
    import json

    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, saved: dict) -> None:
    """Write the results after every pair, so that an interrupted run keeps what it measured."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2), encoding="utf-8")
