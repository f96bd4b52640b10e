"""Per-trial overhead of autoreg against a bare SimpleITK registration with the same parameters (issue 6, cost).

    python benchmarks/overhead.py [--pair cima_lunglesion3_he_ki67] [--trials 12]

The recipe is the SimpleITK-notebooks default for one affine stage (GEOMETRY initializer, Mattes MI 50 bins,
RANDOM 1 %, GD lr 1.0 x 100 with the learning rate estimated once, physical-shift scales, shrink [4,2,1],
sigmas [2,1,0] mm, linear interpolation), one ITK thread. Three ways of running it N times with the seeds a study
gives trials 0..N-1:

* ``bare``: the registration written out below in plain SimpleITK, nothing of autoreg;
* ``engine``: ``autoreg.registration.register`` (normalised frame, per-level TRE, stop checks);
* ``tune``: ``autoreg tune --jobs 1`` of a study whose N trials all run that recipe (pruning off): per trial, Optuna
  ask/tell and journal storage, per-level reports, artifacts; once per command, process start, imports, data
  loading and the study's creation (reported apart: it does not grow with the trials).

Same seeds, same parameters: the three must give the same TRE per run (checked), so the time ratios are overheads.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import studyinfo  # noqa: E402
from common import REPO, machine, pair_files, require_shared_data, stamp, tune, write_pair_yaml  # noqa: E402

from autoreg.config import load_config  # noqa: E402
from autoreg.data import load_pair  # noqa: E402
from autoreg.objective import trial_seed  # noqa: E402
from autoreg.recipe import default_recipe, save_recipe  # noqa: E402
from autoreg.registration import register  # noqa: E402
from autoreg.scoring import tre  # noqa: E402


def bare(fixed: sitk.Image, moving: sitk.Image, seed: int) -> sitk.Transform:
    """The notebooks' default affine registration, in plain SimpleITK (one thread)."""
    tx = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(fixed.GetDimension()), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(0.01, seed)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsGradientDescent(
        learningRate=1.0,
        numberOfIterations=100,
        convergenceMinimumValue=1e-6,
        convergenceWindowSize=10,
        estimateLearningRate=r.Once,
    )
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel([4, 2, 1])
    r.SetSmoothingSigmasPerLevel([2, 1, 0])
    r.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(True)
    r.SetNumberOfThreads(1)
    r.SetInitialTransform(tx, inPlace=True)
    r.Execute(fixed, moving)
    return tx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="cima_lunglesion3_he_ki67")
    ap.add_argument("--trials", type=int, default=12)
    args = ap.parse_args()
    require_shared_data()
    out = REPO / "benchmarks" / "results" / "overhead"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    files = pair_files(args.pair)
    recipe = default_recipe(["affine"], 2).with_(threads=1)
    seeds = [trial_seed(0, t) for t in range(args.trials)]

    # bare and engine alternate run by run, so that load on this shared machine hits both alike
    fixed = sitk.ReadImage(str(files["fixed"]), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(files["moving"]), sitk.sitkFloat32)
    pair = load_pair(load_config(write_pair_yaml(out, args.pair, ["affine"])).pairs[0])
    t_bare = t_engine = 0.0
    tre_bare, tre_engine = [], []
    with_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    for s in seeds:
        t0 = time.perf_counter()
        tx = bare(fixed, moving, s + 1)  # autoreg's stage 0 samples with seed + 1 (ITK reads 0 as the clock)
        t_bare += time.perf_counter() - t0
        tre_bare.append(tre(tx, pair.fixed_points, pair.moving_points, pair.fixed).mean)
        t0 = time.perf_counter()
        res = register(recipe, pair, seed=s)
        t_engine += time.perf_counter() - t0
        tre_engine.append(tre(res.transform, pair.fixed_points, pair.moving_points, pair.fixed).mean)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(with_threads)

    # tune: trial 0 is the default (baseline); the others are the same recipe, enqueued
    path = out / "default-affine.yaml"
    save_recipe(recipe, path)
    pair_yaml = write_pair_yaml(
        out, args.pair, ["affine"], prune=False, deterministic=True, enqueue=[str(path)] * (args.trials - 1)
    )
    _, t_tune = tune(pair_yaml, out / "study", args.trials, 1)
    study = studyinfo.load(out / "study", pair_yaml.stem)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    tre_tune = [t.value for t in trials]
    span = studyinfo.figures(study)["span_s"]  # first trial's start to last trial's end: the per-trial part

    same = np.allclose(tre_bare, tre_engine, atol=1e-6) and np.allclose(tre_engine, tre_tune, atol=1e-6)
    print(
        f"# overhead: {args.pair} [affine], notebooks default recipe, 1 ITK thread, {args.trials} runs "
        f"({stamp()}, {machine()})"
    )
    print(f"bare SimpleITK : {t_bare:7.2f} s = {t_bare / args.trials:6.3f} s per registration")
    print(f"autoreg engine : {t_engine:7.2f} s = {t_engine / args.trials:6.3f} s per registration")
    print(
        f"autoreg tune   : {span:7.2f} s = {span / args.trials:6.3f} s per trial (first start to last end), plus "
        f"{t_tune - span:.2f} s once per command (start-up, imports, data, study; {t_tune:.2f} s in all)"
    )
    print(
        f"same TRE in all three, run by run: {same} (mean TRE {np.mean(tre_bare):.3f} / {np.mean(tre_engine):.3f} / "
        f"{np.mean(tre_tune):.3f})"
    )
    print(
        f"engine / bare = {t_engine / t_bare:.3f}; tune per trial / bare = {span / t_bare:.3f}; "
        f"whole command / bare = {t_tune / t_bare:.3f}"
    )


if __name__ == "__main__":
    main()
