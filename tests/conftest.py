"""Shared fixtures: the real data folder, synthetic pairs written as a PAIR.yaml, and the CLI run in-process."""

from __future__ import annotations

import functools
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from autoreg.config import PairSpec
from autoreg.data import PairData
from autoreg.recipe import Recipe
from autoreg.synthetic import SyntheticPair, make_pair, write_pair

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Small sizes keep every registration in the suite well under a second.
SIZE = {2: (64, 64), 3: (32, 32, 32)}


def real_pair_yaml(folder: Path, path: Path, *, name: str, stages: Sequence[str], **extra: Any) -> Path:
    """Write a PAIR.yaml (absolute paths) for one pair folder of ../shared/data; ``extra`` adds top-level keys."""
    doc = {
        "name": name,
        "fixed": str(folder / "fixed.png"),
        "moving": str(folder / "moving.png"),
        "landmarks": {"fixed": str(folder / "fixed_landmarks.csv"), "moving": str(folder / "moving_landmarks.csv")},
        "stages": list(stages),
        **extra,
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on ../shared/data (through the ``shared_data`` fixture) carry the ``realdata`` marker."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real pairs with landmarks (``../shared/data``); the test is skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not present: {SHARED_DATA} holds the real pairs with landmarks")
    return SHARED_DATA


@functools.cache
def synthetic_pair(
    dim: int = 2,
    transform: str = "rigid",
    *,
    seed: int = 0,
    size: tuple[int, ...] | None = None,
    multimodal: bool = False,
    n_landmarks: int = 20,
    magnitude: float = 1.0,
) -> SyntheticPair:
    """``make_pair`` cached per process (the pairs are immutable in use: tests copy before changing them)."""
    return make_pair(
        size or SIZE[dim],
        transform=transform,
        seed=seed,
        multimodal=multimodal,
        n_landmarks=n_landmarks,
        magnitude=magnitude,
    )


def pair_data(pair: SyntheticPair, *, spacing: float | None = None, landmarks: bool = True) -> PairData:
    """A ``PairData`` straight from a synthetic pair (no files); ``spacing`` rescales both grids and the landmarks.

    The synthetic images have spacing 1 and origin 0, so with spacing ``s`` the same voxels sit at ``s`` times the
    physical coordinates: voxel-unit results must not change.
    """
    fixed, moving = pair.fixed, pair.moving
    fixed_points, moving_points = pair.fixed_points, pair.moving_points
    if spacing is not None:
        assert np.allclose(fixed.GetSpacing(), 1.0) and np.allclose(fixed.GetOrigin(), 0.0)
        fixed, moving = sitk.Image(fixed), sitk.Image(moving)
        fixed.SetSpacing((spacing,) * fixed.GetDimension())
        moving.SetSpacing((spacing,) * moving.GetDimension())
        fixed_points, moving_points = fixed_points * spacing, moving_points * spacing
    spec = PairSpec(name="synthetic", fixed=Path("fixed.nii.gz"), moving=Path("moving.nii.gz"))
    if not landmarks:
        return PairData(spec, fixed, moving)
    return PairData(spec, fixed, moving, np.array(fixed_points), np.array(moving_points))


PairYamlFactory = Callable[..., Path]


@pytest.fixture
def pair_yaml(tmp_path: Path) -> PairYamlFactory:
    """Write a synthetic pair and a PAIR.yaml pointing at it; return the yaml's path.

    ``make(dim=2, transform="rigid", stages=("rigid",), extra=None, landmarks=True, folder="data", name="syn",
    seed=0, size=None, multimodal=False)``: 2D pairs are PNG, 3D pairs nii.gz; paths in the yaml are relative to
    it. ``extra`` is merged into the top level of the yaml (a value of ``None`` deletes that key).
    """

    def make(
        dim: int = 2,
        transform: str = "rigid",
        stages: Sequence[str] = ("rigid",),
        extra: dict[str, Any] | None = None,
        *,
        landmarks: bool = True,
        folder: str = "data",
        name: str = "syn",
        seed: int = 0,
        size: tuple[int, ...] | None = None,
        multimodal: bool = False,
    ) -> Path:
        pair = synthetic_pair(dim, transform, seed=seed, size=size, multimodal=multimodal)
        target = tmp_path / folder
        paths = write_pair(pair, target, fmt="png" if dim == 2 else "nii.gz")
        doc: dict[str, Any] = {
            "name": name,
            "fixed": paths["fixed"].name,
            "moving": paths["moving"].name,
        }
        if landmarks:
            doc["landmarks"] = {
                "fixed": paths["fixed_landmarks"].name,
                "moving": paths["moving_landmarks"].name,
            }
        doc["stages"] = list(stages)
        for key, value in (extra or {}).items():
            if value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
        path = target / "PAIR.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        return path

    return make


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``run_cli("check", path)``: ``autoreg.cli.main`` in-process, with its exit code, stdout and stderr."""
    from autoreg.cli import main

    def run(*argv: Any) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def quick_recipe(
    stages: Sequence[str],
    dim: int,
    *,
    strategy: str = "none",
    percentage: float = 1.0,
    shrink: tuple[int, ...] = (2, 1),
    sigmas: tuple[float, ...] = (1.0, 0.0),
    iterations: int = 300,
    learning_rate: float = 2.0,
    bspline_iterations: int = 30,
    mesh: int = 4,
    bins: int = 24,
    **top: Any,
) -> Recipe:
    """A recipe that works on the small synthetic pairs: the default recipe with every stage updated.

    Mattes MI with ``bins`` bins (50 is too many for a few thousand samples); linear stages: regular-step gradient
    descent (its learning rate is re-estimated once per level, as in the default); BSpline stages: LBFGSB on a
    ``mesh``-cell grid; displacement stages: gradient descent on a field at every voxel (update and total field
    smoothed with variances 2 and 1). Sigmas are in voxels, so the recipe means the same on any spacing. ``top``
    replaces top-level fields (seed, deterministic...).
    """
    from autoreg.recipe import (
        LBFGSB,
        BSplineTransform,
        DisplacementTransform,
        GradientDescent,
        MattesMutualInformation,
        Pyramid,
        RegularStepGradientDescent,
        Sampling,
        default_recipe,
    )

    base = default_recipe(stages, dim)
    pyramid = Pyramid(shrink_factors=shrink, smoothing_sigmas=sigmas, sigma_units="voxel")
    sampling = Sampling(strategy=strategy) if strategy == "none" else Sampling(strategy=strategy, percentage=percentage)
    updated = []
    for stage in base.stages:
        update: dict[str, Any] = {
            "sampling": sampling,
            "pyramid": pyramid,
            "metric": MattesMutualInformation(number_of_histogram_bins=bins),
        }
        if stage.kind == "bspline":
            update["optimizer"] = LBFGSB(number_of_iterations=bspline_iterations)
            update["transform"] = BSplineTransform(mesh_size=(mesh,) * dim)
        elif stage.kind == "displacement":
            update["optimizer"] = GradientDescent(number_of_iterations=bspline_iterations, scales="physical_shift")
            update["transform"] = DisplacementTransform(variance_for_update_field=2.0, variance_for_total_field=1.0)
            update["pyramid"] = pyramid.model_copy(update={"shrink_images": True})
        else:
            update["optimizer"] = RegularStepGradientDescent(
                learning_rate=learning_rate, number_of_iterations=iterations, gradient_magnitude_tolerance=1e-5
            )
        updated.append(stage.model_copy(update=update))
    # model_copy does not validate: validate the whole recipe once more
    return Recipe.model_validate({**base.model_dump(), "stages": [s.model_dump() for s in updated], **top})


# --- a throw-away PostgreSQL server (test_study_postgres, test_dask, test_study_redact) ----------------------------


def _server_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of its own (trust authentication, 127.0.0.1 on a free port) for the module's tests; skips,
    saying why, without the server programs or the driver."""
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver SQLAlchemy uses) is not installed")
    initdb, pg_ctl = _server_bin("initdb"), _server_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) not found; install Debian's 'postgresql'")
    # not under pytest's own temp folder: that is private to root, and the server runs as another account
    root = Path(tempfile.mkdtemp(prefix="autoreg-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the 'postgres' account
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' account to run the server")
        for p in (root, sock):
            os.chown(p, account.pw_uid, account.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    made = run(initdb, "-D", str(data), "-A", "trust", "-U", "autoreg", "--no-sync")
    if made.returncode != 0:
        pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
    started = run(
        pg_ctl,
        "-D",
        str(data),
        "-l",
        str(root / "server.log"),
        "-w",
        "-o",
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off",
        "start",
    )
    if started.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {started.stderr.strip()[-300:]}")
    try:
        yield f"postgresql://autoreg:not-a-secret@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


# --- process trees (the fault tests: killed tunes, Ctrl-C) -----------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, through every thread's children (a tune starts its workers from one thread)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` still running (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out
