"""The peers autoreg is compared with (issue 6), each behind one function: register a pair, map the fixed landmarks.

Every function returns ``(mapped, seconds)``: ``mapped[i]`` is where the tool sends fixed landmark i in the moving
image's physical space (ITK's convention, the one autoreg's TRE uses), and ``seconds`` is the wall time of the
registration alone (reading images and mapping points excluded). The peers come from the ``bench`` extra:
``pip install -e ".[bench]"`` (itk-elastix, antspyx).

Conventions, checked on a pair with a known shift by ``peers.py --check``:

* elastix: the result transform maps fixed points to moving points, as in ITK; transformix applies it to a
  fixed point set (``OutputPoint`` in ``outputpoints.txt``).
* ANTs: ``fwdtransforms`` warp the moving image onto the fixed one, so as point transforms they map fixed points
  to moving points; ``apply_transforms_to_points`` with them takes fixed landmarks into moving space.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

#: elastix's default parameter maps for autoreg's stage names (translation pairs are tuned as rigid).
ELASTIX_MAPS = {
    "translation": "translation",
    "rigid": "rigid",
    "similarity": "affine",
    "affine": "affine",
    "bspline": "bspline",
    "deformable": "bspline",
}


#: The ANTs transform type that matches a stage list: linear stages map to Rigid/Affine; a deformable last stage
#: to SyN (ANTs' own rigid + affine + SyN pipeline, the usual choice of ANTs users).
def ants_type(stages: list[str]) -> str:
    if stages[-1] in ("bspline", "deformable"):
        return "SyN"
    return {"translation": "Translation", "rigid": "Rigid"}.get(stages[-1], "Affine")


def elastix_maps(stages: list[str]) -> list[str]:
    return [ELASTIX_MAPS[s] for s in stages]


def run_elastix(
    fixed: Path, moving: Path, fixed_points: np.ndarray, stages: list[str], *, threads: int = 2, seed: int = 1
) -> tuple[np.ndarray, float]:
    import itk

    # Threads through ITK's global default: SetNumberOfThreads(2) on the method segfaults itk-elastix 0.25.4 in
    # its BSpline stage (seen on 2D pairs here).
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    f = itk.imread(str(fixed), itk.F)
    m = itk.imread(str(moving), itk.F)
    params = itk.ParameterObject.New()
    for name in elastix_maps(stages):
        pmap = params.GetDefaultParameterMap(name)
        pmap["RandomSeed"] = [str(seed)]
        params.AddParameterMap(pmap)
    method = itk.ElastixRegistrationMethod.New(f, m)
    method.SetParameterObject(params)
    method.SetLogToConsole(False)
    t0 = time.perf_counter()
    method.UpdateLargestPossibleRegion()
    seconds = time.perf_counter() - t0
    # transformix maps a fixed point set through the result (GetCombinationTransform() crashes itk-elastix 0.25
    # on affine + bspline results, so the documented file route is used).
    with tempfile.TemporaryDirectory() as tmp:
        points_file = Path(tmp) / "fixed_points.txt"
        rows = "".join(" ".join(f"{c:.6f}" for c in p) + "\n" for p in fixed_points)
        points_file.write_text(f"point\n{len(fixed_points)}\n{rows}")
        itk.transformix_pointset(
            m, method.GetTransformParameterObject(), fixed_point_set_file_name=str(points_file), output_directory=tmp
        )
        text = (Path(tmp) / "outputpoints.txt").read_text()
    mapped = np.array([[float(c) for c in found.split()] for found in _OUTPUT_POINT.findall(text)], dtype=float)
    if mapped.shape != fixed_points.shape:
        raise RuntimeError(f"transformix returned {mapped.shape} points for {fixed_points.shape}")
    return mapped, seconds


_OUTPUT_POINT = re.compile(r"OutputPoint = \[([^\]]*)\]")


def run_ants(
    fixed: Path,
    moving: Path,
    fixed_points: np.ndarray,
    stages: list[str],
    *,
    threads: int = 2,
    seed: int = 1,
    direction: str = "fwd",
    transform_type: str | None = None,
) -> tuple[np.ndarray, float]:
    """``transform_type`` overrides the type that ``ants_type(stages)`` picks (``SyNOnly``: no linear stages)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants
    import pandas as pd

    f = ants.image_read(str(fixed), pixeltype="float")
    m = ants.image_read(str(moving), pixeltype="float")
    t0 = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform=transform_type or ants_type(stages), random_seed=seed)
    seconds = time.perf_counter() - t0
    dim = fixed_points.shape[1]
    cols = ["x", "y", "z"][:dim]
    pts = pd.DataFrame(fixed_points, columns=cols)
    if direction == "fwd":
        out = ants.apply_transforms_to_points(dim, pts, reg["fwdtransforms"])
    else:  # the other convention, only for the check that shows which one is right
        inv = reg["invtransforms"]
        out = ants.apply_transforms_to_points(dim, pts, inv, whichtoinvert=[n.endswith(".mat") for n in inv])
    return out[cols].to_numpy(dtype=float), seconds


def elastix_inverse_convention(
    fixed: Path, moving: Path, fixed_points: np.ndarray, stages: list[str], **kw
) -> tuple[np.ndarray, float]:
    """elastix run with fixed and moving swapped: the wrong convention, for the check only."""
    return run_elastix(moving, fixed, fixed_points, stages, **kw)


def versions() -> dict[str, str]:
    out = {}
    for mod, name in (("itk", "itk-elastix (ITK)"), ("ants", "antspyx")):
        try:
            m = __import__(mod)
            out[name] = getattr(m, "__version__", "?")
        except ImportError:
            out[name] = "not installed"
    try:
        from importlib.metadata import version

        out["itk-elastix"] = version("itk-elastix")
    except Exception:  # noqa: BLE001 - only a label
        pass
    return out


def run_child(cmd: list[str], tool: str, timeout: float) -> dict:
    """A peer's run in its own process (``cmd`` prints one JSON line): its result, or ``failed`` with the reason,
    so that a peer that crashes (itk-elastix can) or hangs is recorded, not fatal."""
    import json
    import subprocess

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "failed": f"over {timeout:.0f} s (killed)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        if proc.returncode < 0:
            why = f"crashed (signal {-proc.returncode})"
        return {"tool": tool, "failed": why[:200]}
    return json.loads(lines[-1])
