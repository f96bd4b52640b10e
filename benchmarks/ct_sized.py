"""How long SimpleITK's default recipe (every study's baseline) takes on a CT-sized grid, against what check predicts.

    pip install -e ".[bench]"
    python benchmarks/ct_sized.py [--stages affine,deformable] [--no-run]

The pair: the MNI volume of ../shared/data's AFIDs pair resampled onto a 0.6 x 0.6 x 1.25 mm grid (303 x 363 x 146,
16 million voxels: a CT series' in-plane spacing and slice spacing) as the fixed image, and the same volume smoothed
by 2.5 mm, moved by a known rigid transform (7-11 deg about the three axes, a 11 mm shift) and sampled at 2.5 mm
with a monotone intensity remap (a PET-like moving image); landmarks: the AFIDs fixed landmarks and their images
under the transform. It is written to ``benchmarks/results/ct_sized``. The command prints ``autoreg check``'s
prediction of the baseline's seconds, then registers the baseline recipe once on one thread (as a study's trial 0
runs) and prints its seconds and TRE (``--no-run``: the prediction only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, machine, require_shared_data, stamp  # noqa: E402

OUT = RESULTS / "ct_sized"
SOURCE = SHARED_DATA / "afids_mni152nlin6asym_colin27_t1"
FIXED_SPACING = (0.6, 0.6, 1.25)
MOVING_SPACING = (2.5, 2.5, 2.5)


def build(stages: list[str]) -> Path:
    """Write the pair and its PAIR.yaml; return the yaml's path."""
    import SimpleITK as sitk

    src = sitk.ReadImage(str(SOURCE / "fixed.nii.gz"), sitk.sitkFloat32)

    def regrid(image, spacing, transform):
        size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
        grid = sitk.Image(size, sitk.sitkFloat32)
        grid.SetSpacing(spacing)
        grid.SetOrigin(image.GetOrigin())
        grid.SetDirection(image.GetDirection())
        return sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0)

    fixed = regrid(src, FIXED_SPACING, sitk.Transform(3, sitk.sitkIdentity))
    truth = sitk.Euler3DTransform()  # fixed physical point -> moving physical point
    truth.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([n / 2 for n in fixed.GetSize()]))
    truth.SetRotation(0.12, -0.08, 0.2)
    truth.SetTranslation((8.0, -6.0, 5.0))
    moving = regrid(sitk.SmoothingRecursiveGaussian(src, 2.5), MOVING_SPACING, truth.GetInverse())
    moving = sitk.Cast(sitk.Sqrt(sitk.Abs(moving) + 1.0) * 100.0, sitk.sitkFloat32)
    OUT.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Cast(fixed, sitk.sitkInt16), str(OUT / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(OUT / "moving.nii.gz"))
    points = np.loadtxt(SOURCE / "fixed_landmarks.csv", delimiter=",", skiprows=1)
    moved = np.array([truth.TransformPoint(p.tolist()) for p in points])
    for name, pts in (("fixed", points), ("moving", moved)):
        np.savetxt(OUT / f"{name}_landmarks.csv", pts, delimiter=",", header="x,y,z", comments="")
    pair = OUT / "pair.yaml"
    pair.write_text(
        "name: ct_sized\nfixed: fixed.nii.gz\nmoving: moving.nii.gz\n"
        "landmarks: {fixed: fixed_landmarks.csv, moving: moving_landmarks.csv}\n"
        f"stages: [{', '.join(stages)}]\n",
        encoding="utf-8",
    )
    return pair


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="affine,deformable")
    parser.add_argument("--no-run", action="store_true", help="print check's prediction only")
    args = parser.parse_args()
    require_shared_data()
    print(f"# ct_sized ({stamp()}, {machine()})", flush=True)
    pair = build(args.stages.split(","))
    check = subprocess.run(["autoreg", "check", str(pair)], capture_output=True, text=True, check=True).stdout
    said = [line for line in check.splitlines() if "the baseline (trial 0" in line]
    print(said[0] if said else "check: the baseline is predicted under a minute", flush=True)
    if args.no_run:
        return 0
    from autoreg.pipeline import Pipeline
    from autoreg.registration import register
    from autoreg.scoring import tre

    pipe = Pipeline.load(pair)
    data = pipe.all_landmark_pairs[0]
    recipe = pipe.space.baseline_recipe().with_(threads=1)
    t0 = time.perf_counter()
    result = register(recipe, data)
    seconds = time.perf_counter() - t0
    score = tre(result.transform, data.fixed_points, data.moving_points, data.fixed).mean
    print(f"baseline on one thread: {seconds:.0f} s ({seconds / 60:.1f} min), mean TRE {score:.3f} mm", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
