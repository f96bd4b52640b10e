"""Spacing invariance (issue 4): one recipe on identical voxels at spacings 0.1, 1, 4 and 10, run by autoreg and by
plain SimpleITK with the same settings.

    python benchmarks/spacing.py [--size 40]

"plain SimpleITK" is autoreg's own engine with the normalised frame switched off (``frame_scale`` fixed to 1):
every setting is then read in physical units, as `sitk.ImageRegistrationMethod` reads them. The recipes are in
voxel units (sigmas, mesh), as the ones autoreg tunes; the BSpline stage uses LBFGS2 and PhysicalShift-scaled
gradient descent as in the user report the issue cites. Needs no ../shared data (synthetic 3D pair).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import SimpleITK as sitk  # noqa: E402
from common import machine, stamp  # noqa: E402

from autoreg import registration  # noqa: E402
from autoreg.config import PairSpec  # noqa: E402
from autoreg.data import PairData  # noqa: E402
from autoreg.recipe import Recipe, recipe_from_dict  # noqa: E402
from autoreg.registration import frame  # noqa: E402
from autoreg.scoring import tre  # noqa: E402
from autoreg.synthetic import make_pair  # noqa: E402

SPACINGS = (0.1, 1.0, 4.0, 10.0)
#: A registration still running after this is reported as "fail(time limit)" (LBFGS2 can crawl when its
#: tolerances are read in the wrong units).
TIME_LIMIT_S = 120.0


def rescaled(syn, s: float) -> PairData:
    def img(i):
        out = sitk.Image(i)
        out.SetSpacing((s,) * i.GetDimension())
        return out

    return PairData(
        PairSpec(name=f"s{s}", fixed=Path("f"), moving=Path("m")),
        img(syn.fixed),
        img(syn.moving),
        syn.fixed_points * s,
        syn.moving_points * s,
    )


def recipes() -> dict[str, Recipe]:
    """The user report's settings in recipe format 2: voxel sigmas and mesh, so only the spacing differs."""
    common = {
        "metric": {"kind": "mattes", "number_of_histogram_bins": 32},
        "sampling": {"strategy": "regular", "percentage": 0.2},
        "pyramid": {"shrink_factors": [2, 1], "smoothing_sigmas": [1.0, 0.0], "sigma_units": "voxel"},
    }
    gd = {
        "kind": "gradient_descent",
        "learning_rate": 1.0,
        "estimate_learning_rate": "never",
        "number_of_iterations": 100,
    }
    linear = {
        "rigid": {"transform": "rigid", "optimizer": gd, **common},
        "affine": {"transform": "affine", "optimizer": gd, **common},
    }
    mesh = {"kind": "bspline", "mesh_size": [4, 4, 4]}
    bspline = {
        "LBFGS2": {
            "transform": mesh,
            "optimizer": {
                "kind": "lbfgs2",
                "number_of_iterations": 30,
                "solution_accuracy": 1e-5,
                "scales": "physical_shift",
            },
            **common,
        },
        "GD": {"transform": mesh, "optimizer": {**gd, "number_of_iterations": 50}, **common},
    }

    def recipe(*stages: dict) -> Recipe:
        return recipe_from_dict({"autoreg_recipe": 2, "stages": list(stages), "deterministic": True, "seed": 1})

    return {
        "rigid": recipe(linear["rigid"]),
        "affine": recipe(linear["affine"]),
        **{f"affine+bspline ({k})": recipe(linear["affine"], v) for k, v in bspline.items()},
    }


def voxel_tre(recipe: Recipe, pair: PairData) -> str:
    try:
        result = registration.register(recipe, pair, time_limit=TIME_LIMIT_S)
    except registration.RegistrationFailed as err:
        return f"fail({err.reason[:18]})"
    return f"{tre(result.transform, pair.fixed_points, pair.moving_points, pair.fixed).mean_vox:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=40)
    ap.add_argument("--only", default="", help="comma-separated parts of recipe names to run (default: all)")
    args = ap.parse_args()
    kinds = {
        "rigid": "rigid",
        "affine": "affine",
        "affine+bspline (LBFGS2)": "bspline",
        "affine+bspline (GD)": "bspline",
    }
    print(f"# spacing invariance: voxel TRE on identical {args.size}^3 voxels ({stamp()}, {machine()})")
    print(f"{'recipe':26s} {'engine':8s} " + " ".join(f"{'s=' + str(s):>16s}" for s in SPACINGS) + "   max/min")
    only = [n for n in args.only.split(",") if n]
    for name, recipe in recipes().items():
        if only and not any(o in name for o in only):
            continue
        syn = make_pair((args.size,) * 3, transform=kinds[name], seed=4)
        before = tre(sitk.Transform(3, sitk.sitkIdentity), syn.fixed_points, syn.moving_points, syn.fixed).mean_vox
        for engine in ("autoreg", "plain"):
            if engine == "plain":
                with mock.patch.object(frame, "frame_scale", lambda image: 1.0):
                    vals = [voxel_tre(recipe, rescaled(syn, s)) for s in SPACINGS]
            else:
                vals = [voxel_tre(recipe, rescaled(syn, s)) for s in SPACINGS]
            nums = [float(v) for v in vals if not v.startswith("fail")]
            ratio = f"{max(nums) / min(nums):.3f}" if len(nums) == len(vals) and min(nums) > 0 else "-"
            print(
                f"{name:26s} {engine:8s} " + " ".join(f"{v:>16s}" for v in vals) + f"   {ratio}  (before {before:.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
