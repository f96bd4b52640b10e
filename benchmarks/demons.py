"""Does a Demons stage earn its place? SimpleITK's fast symmetric-forces Demons against autoreg's displacement stage,
after the same affine stage, on same-modality deformable pairs with exact ground truth (the case Demons is made for).

    python benchmarks/demons.py [--size2d 256] [--size3d 96]
    python benchmarks/demons.py --histology     # histogram matching before Demons, on the histology pairs

Prints mean TRE and seconds per pair and method. Demons runs on the same prepared pyramid (shrink 4, 2, 1), its field
upsampled between levels; its settings are the usual ones (update-field smoothing 1 voxel, total field 1.5 voxels).

``--histology``: on each histology pair of ../shared/data (two stains: one tissue, intensities that differ), the
default affine stage (after a rotation and shift search) then the default Demons stage (``recipe.default_demons_stage``), with the moving level's
histogram matched to the fixed one's over every voxel, above the mean only, or not at all: mean TRE over every
landmark and seconds (1 thread).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from autoreg.config import PairSpec  # noqa: E402
from autoreg.data import PairData  # noqa: E402
from autoreg.recipe import (  # noqa: E402
    DisplacementTransform,
    GradientDescent,
    LinearTransform,
    MeanSquares,
    Pyramid,
    Recipe,
    RegularStepGradientDescent,
    Sampling,
    Stage,
)
from autoreg.registration import register  # noqa: E402
from autoreg.scoring import tre  # noqa: E402
from autoreg.synthetic import make_pair  # noqa: E402

PYRAMID = Pyramid(shrink_factors=(4, 2, 1), smoothing_sigmas=(2.0, 1.0, 0.0), sigma_units="voxel", shrink_images=True)
AFFINE = Stage(
    transform=LinearTransform(kind="affine"),
    metric=MeanSquares(use_fixed_image_gradient_filter=False, use_moving_image_gradient_filter=False),
    sampling=Sampling(strategy="random", points=20000),
    optimizer=RegularStepGradientDescent(number_of_iterations=200, gradient_magnitude_tolerance=1e-6),
    pyramid=PYRAMID,
)


def displacement_stage(iterations: int) -> Stage:
    return Stage(
        transform=DisplacementTransform(variance_for_update_field=2.0, variance_for_total_field=1.0),
        metric=MeanSquares(),
        sampling=Sampling(strategy="none"),
        optimizer=GradientDescent(number_of_iterations=iterations, scales="physical_shift"),
        pyramid=PYRAMID,
    )


def demons(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, iterations: int) -> sitk.Transform:
    """Fast symmetric-forces Demons over shrink 4, 2, 1 on the moving image resampled through ``initial``."""
    warped = sitk.Resample(moving, fixed, initial, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    field = None
    for shrink, sigma in ((4, 2.0), (2, 1.0), (1, 0.0)):
        f = sitk.BinShrink(fixed, [shrink] * fixed.GetDimension())
        m = sitk.BinShrink(warped, [shrink] * fixed.GetDimension())
        if sigma > 0:
            f, m = (
                sitk.SmoothingRecursiveGaussian(f, sigma * shrink),
                sitk.SmoothingRecursiveGaussian(m, sigma * shrink),
            )
        filt = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        filt.SetNumberOfIterations(iterations)
        filt.SetSmoothDisplacementField(True)
        filt.SetStandardDeviations(1.5)
        filt.SetSmoothUpdateField(True)
        filt.SetUpdateFieldStandardDeviations(1.0)
        if field is None:
            field = filt.Execute(f, m)
        else:
            start = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = filt.Execute(f, m, start)
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    composite = sitk.CompositeTransform(fixed.GetDimension())
    composite.AddTransform(initial)
    composite.AddTransform(sitk.DisplacementFieldTransform(field))
    return composite


def histology() -> int:
    """Demons' ``match_histograms`` settings on the histology pairs, after the same default affine stage."""
    from common import HISTOLOGY, RESULTS, require_shared_data, write_pair_yaml

    from autoreg.pipeline import Pipeline
    from autoreg.recipe import Initializer, RotationSearch, default_demons_stage, default_stage

    require_shared_data()
    print(f"{'pair':34s} {'match_histograms':>16s} {'TRE':>8s} {'seconds':>8s}")
    for name in HISTOLOGY:
        pair = Pipeline.load(write_pair_yaml(RESULTS / "demons", name, ["affine", "displacement"])).all_landmark_pairs[
            0
        ]
        dim = pair.dim
        stage = default_demons_stage(dim)
        for how in ("off", "all", "above_mean"):
            demons_stage = stage.model_copy(
                update={"optimizer": stage.optimizer.model_copy(update={"match_histograms": how})}
            )
            recipe = Recipe(
                initializer=Initializer(
                    kind="best", rotation_search=RotationSearch(max_shift_fraction=0.1, shift_steps=2)
                ),
                stages=(default_stage("affine", dim), demons_stage),
                threads=1,
            )
            t0 = time.perf_counter()
            out = register(recipe, pair).transform
            seconds = time.perf_counter() - t0
            print(
                f"{name:34s} {how:>16s} {tre(out, pair.fixed_points, pair.moving_points, pair.fixed).mean:8.3f} {seconds:8.2f}",
                flush=True,
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histology", action="store_true", help="histogram matching before Demons, histology pairs")
    parser.add_argument("--size2d", type=int, default=256)
    parser.add_argument("--size3d", type=int, default=96)
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    if args.histology:
        return histology()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    print(f"{'pair':18s} {'method':26s} {'TRE before':>10s} {'TRE after':>10s} {'seconds':>8s}")
    for dim, size in ((2, args.size2d), (3, args.size3d)):
        syn = make_pair((size,) * dim, transform="bspline", seed=4, magnitude=2.0)
        pair = PairData(
            PairSpec("syn", Path("f"), Path("m")), syn.fixed, syn.moving, syn.fixed_points, syn.moving_points
        )
        name = f"{dim}D bspline {size}^{dim}"
        before = tre(sitk.Transform(dim, sitk.sitkIdentity), syn.fixed_points, syn.moving_points, syn.fixed).mean
        t0 = time.perf_counter()
        affine = register(Recipe(stages=(AFFINE,), threads=2), pair).transform
        t_affine = time.perf_counter() - t0
        print(
            f"{name:18s} {'affine':26s} {before:10.3f} {tre(affine, syn.fixed_points, syn.moving_points, syn.fixed).mean:10.3f} {t_affine:8.2f}"
        )
        t0 = time.perf_counter()
        disp = register(Recipe(stages=(AFFINE, displacement_stage(args.iterations)), threads=2), pair).transform
        t_disp = time.perf_counter() - t0
        print(
            f"{name:18s} {'affine + displacement':26s} {before:10.3f} {tre(disp, syn.fixed_points, syn.moving_points, syn.fixed).mean:10.3f} {t_disp:8.2f}"
        )
        t0 = time.perf_counter()
        dem = demons(syn.fixed, syn.moving, affine, args.iterations)
        t_dem = time.perf_counter() - t0 + t_affine
        print(
            f"{name:18s} {'affine + Demons (FSF)':26s} {before:10.3f} {tre(dem, syn.fixed_points, syn.moving_points, syn.fixed).mean:10.3f} {t_dem:8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
