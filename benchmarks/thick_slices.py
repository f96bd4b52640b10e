"""Thick slices: a pyramid that shrinks each axis to about the same voxel size against one that shrinks every axis alike.

    pip install -e .
    python benchmarks/thick_slices.py [--slice-mm 6] [--trials 30] [--jobs 2]

The afids brain of ../shared/data (182 x 218 x 182, 1 mm) resampled to slices ``--slice-mm`` thick, and the same
volume moved by a known rigid motion (6 degrees about each axis, a shift of (8, -6, 5) mm) sampled on the same grid;
its landmarks are the AFIDs fiducials of the fixed brain and their images under the motion (exact). Per pyramid, the
same affine recipe (Mattes MI, 5000 points a level, regular-step gradient descent, shrink 8-4-2-1, sigmas half the
shrink in voxels) on prepared levels (``shrink_images: true``: ``registration.axis_factors``, a thin axis is shrunk,
a thick one less), on prepared levels with the rule before it (the level's shrink on every axis, patched in here: a
6 mm slice becomes 48 mm at shrink 8), and on ITK's own pyramid (``false``, every axis alike): the TRE over every
landmark and the seconds of the registration, 2 threads, three seeds each; and the same recipe on one full-resolution
level, all that a study could use here before (its deepest shrink was the 30 slices' 30 // 16 = 1). Then what
``check`` allows (the deepest shrink, per axis) and a study of the pair (``--trials``; ``--trials 0`` leaves it out).
Results to ``benchmarks/results/thick_slices.json``, the table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, pair_files, require_shared_data, save_results, saved_results, stamp, tune  # noqa: E402

OUT = RESULTS / "thick_slices.json"
WORK = RESULTS / "thick_slices"
SOURCE = "afids_mni152nlin6asym_colin27_t1"
ROTATION_DEG, SHIFT_MM = (6.0, 6.0, 6.0), (8.0, -6.0, 5.0)
SEEDS = (0, 1, 2)
#: Shrink factors and sigmas (voxels) of the compared recipe.
PYRAMID = ((8, 4, 2, 1), (4.0, 2.0, 1.0, 0.0))


def build(slice_mm: float) -> Path:
    """The thick-slice pair's folder: both images on the same grid of ``slice_mm`` slices, exact landmarks."""
    import SimpleITK as sitk
    import yaml

    from autoreg.landmarks import read_landmarks

    files = pair_files(SOURCE)
    brain = sitk.ReadImage(str(files["fixed"]), sitk.sitkFloat32)
    motion = sitk.Euler3DTransform()
    motion.SetCenter(brain.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in brain.GetSize()]))
    motion.SetRotation(*np.radians(ROTATION_DEG))
    motion.SetTranslation(SHIFT_MM)  # maps fixed points to moving points
    size = list(brain.GetSize())
    spacing = list(brain.GetSpacing())
    size[2] = int(size[2] * spacing[2] / slice_mm)
    spacing[2] = slice_mm
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetDirection(brain.GetDirection())
    grid.SetOrigin(
        brain.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, (slice_mm / brain.GetSpacing()[2] - 1) / 2])
    )
    # a thick slice averages its thickness: smooth along z by the slice profile before sampling
    profile = sitk.DiscreteGaussian(brain, [0.01, 0.01, (slice_mm / 2.355) ** 2], useImageSpacing=True)
    fixed = sitk.Resample(profile, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    moving = sitk.Resample(profile, grid, motion.GetInverse(), sitk.sitkLinear, 0.0)
    folder = WORK / f"slab{slice_mm:g}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sitk.WriteImage(fixed, str(folder / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(folder / "moving.nii.gz"))
    points = read_landmarks(files["fixed_landmarks"], image=brain, dim=3, key="fixed")
    inside = [
        p
        for p in points
        if all(0 <= c <= n - 1 for c, n in zip(fixed.TransformPhysicalPointToContinuousIndex(p), size))
    ]
    mapped = [motion.TransformPoint(tuple(map(float, p))) for p in inside]
    for role, p in (("fixed", inside), ("moving", mapped)):
        np.savetxt(folder / f"{role}_landmarks.csv", p, delimiter=",", header="x,y,z", comments="", fmt="%.6f")
    doc = {
        "name": f"slab{slice_mm:g}",
        "fixed": str(folder / "fixed.nii.gz"),
        "moving": str(folder / "moving.nii.gz"),
        "landmarks": {"fixed": str(folder / "fixed_landmarks.csv"), "moving": str(folder / "moving_landmarks.csv")},
        "stages": ["affine"],
    }
    path = folder / "pair.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def recipe(prepared: bool, seed: int, shrinks: tuple[int, ...], sigmas: tuple[float, ...]):
    from autoreg.recipe import MattesMutualInformation, Pyramid, RegularStepGradientDescent, Sampling, default_recipe

    base = default_recipe(["affine"], 3, seed=seed)
    stage = base.stages[0].model_copy(
        update={
            "metric": MattesMutualInformation(number_of_histogram_bins=32),
            "sampling": Sampling(strategy="random", points=5000),
            "optimizer": RegularStepGradientDescent(learning_rate=1.0, number_of_iterations=200),
            "pyramid": Pyramid(
                shrink_factors=shrinks,
                smoothing_sigmas=sigmas,
                sigma_units="voxel",
                shrink_images=prepared,
            ),
        }
    )
    return base.with_(stages=[stage], threads=2)


def compare(path: Path) -> dict:
    from autoreg.config import load_config
    from autoreg.data import load_pair
    from autoreg.registration import RegistrationFailed, register
    from autoreg.scoring import tre

    pair = load_pair(load_config(path).pairs[0])
    out: dict = {}
    variants = (
        ("prepared levels, per axis", True, False, PYRAMID),
        ("prepared levels, every axis alike (the rule before)", True, True, PYRAMID),
        ("one level (all the rule before allowed a study here)", True, False, ((1,), (0.0,))),
        ("ITK's pyramid, every axis alike", False, False, PYRAMID),
    )
    for label, prepared, alike, (shrinks, sigmas) in variants:
        runs = []
        for seed in SEEDS:
            t0 = time.perf_counter()
            try:
                with _every_axis_alike() if alike else contextlib.nullcontext():
                    result = register(recipe(prepared, seed, shrinks, sigmas), pair)
                value = tre(result.transform, pair.fixed_points, pair.moving_points, pair.fixed).mean
            except RegistrationFailed as err:
                value = None
                print(f"{label}, seed {seed}: {err}", flush=True)
            runs.append({"seed": seed, "tre": value, "seconds": time.perf_counter() - t0})
        out[label] = runs
    return out


def _every_axis_alike():
    """Prepared levels as they were before ``axis_factors``: the level's shrink on every axis."""
    from unittest import mock

    from autoreg.registration import fields, pyramid

    def alike(spacing, shrink, size=None):
        return [shrink if size is None else min(shrink, int(n)) for n in (size or spacing)]

    stack = contextlib.ExitStack()
    for module in (pyramid, fields):
        stack.enter_context(mock.patch.object(module, "axis_factors", alike))
    return stack


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slice-mm", type=float, default=6.0)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only print the saved results")
    args = ap.parse_args()
    saved = saved_results(OUT)
    key = f"slab{args.slice_mm:g}"
    if not args.report:
        require_shared_data()
        from autoreg.config import load_config
        from autoreg.data import load_pair
        from autoreg.fingerprint import fingerprint_dataset
        from autoreg.objective import identity_tre
        from autoreg.registration import axis_factors

        print(f"# thick_slices ({stamp()}, {machine()})", flush=True)
        path = build(args.slice_mm)
        pair = load_pair(load_config(path).pairs[0])
        fp = fingerprint_dataset([pair]).pairs[0]
        row = {
            "size": list(pair.fixed.GetSize()),
            "spacing": list(pair.fixed.GetSpacing()),
            "landmarks": len(pair.fixed_points),
            "before": identity_tre(pair),
            "max_shrink": fp.max_shrink,
            "deepest_factors": axis_factors(fp.fixed.spacing, fp.max_shrink, fp.fixed.size),
            "pyramids": compare(path),
        }
        if not args.trials and "study" in saved.get(key, {}):
            row["study"] = saved[key]["study"]  # kept from the last run that tuned
        if args.trials:
            import studyinfo

            from autoreg.trial import best_and_baseline, records

            proc, wall = tune(path, path.parent / "study", args.trials, args.jobs, check=False)
            best, base = best_and_baseline(records(studyinfo.load(path.parent / "study", key)))
            row["study"] = {
                "exit": proc.returncode,
                "wall_s": round(wall, 1),
                "trials": args.trials,
                "best": best.value if best else None,
                "honest": best.tre_report_mean if best else None,
                "best_shrinks": best.recipe["stages"][0]["pyramid"]["shrink_factors"] if best else None,
                "baseline": base.value if base else None,
            }
        saved[key] = row
        save_results(OUT, saved)
    for name, row in saved.items():
        print(
            f"{name}: {'x'.join(map(str, row['size']))} voxels of {'x'.join(f'{s:g}' for s in row['spacing'])} mm, "
            f"{row['landmarks']} landmarks, TRE before {row['before']:.3g} mm; deepest shrink {row['max_shrink']} "
            f"(per axis {'x'.join(map(str, row['deepest_factors']))})"
        )
        print("| pyramid | TRE per seed (mm) | mean | seconds per seed |")
        print("|---|---|---:|---|")
        for label, runs in row["pyramids"].items():
            tres = [r["tre"] for r in runs]
            ok = [t for t in tres if t is not None]
            seconds = " / ".join(f"{r['seconds']:.1f}" for r in runs)
            print(
                f"| {label} | {' / '.join('failed' if t is None else f'{t:.3g}' for t in tres)} | "
                f"{np.mean(ok) if ok else float('nan'):.3g} | {seconds} |"
            )
        if "study" in row:
            s = row["study"]
            print(
                f"study, {s['trials']} trials: best {s['best']:.3g} mm (honest {s['honest']:.3g}, shrinks "
                f"{s['best_shrinks']}), SimpleITK's default {s['baseline']:.3g} mm, {s['wall_s']:.0f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
