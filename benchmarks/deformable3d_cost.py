"""Why a SimpleITK BSpline stage cannot be both accurate and fast in 3D, and a displacement field can (issue 13).

    python benchmarks/make_3d_set.py --only mmdef3d      # once, if benchmarks/data3d/mmdef3d is missing
    python benchmarks/deformable3d_cost.py [--threads 2]

On mmdef3d's full-resolution level (182 x 218 x 182 voxels), one deformable stage is run for 2 and for 12 gradient
descent iterations (convergence checks off) at several sample counts and grid sizes; the difference over 10 is the
seconds of one iteration, free of the stage's setup. ITKv4's metric adds every sample's derivative over all of a
BSpline transform's parameters (its Jacobian is dense), so an iteration costs ~ samples x parameters; a displacement
field has local support (each sample touches its own few field voxels), so an iteration costs ~ samples. The
column ``ns per sample x parameter`` stays flat for BSpline if the first law holds.
Results go to ``benchmarks/results/deformable3d_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, stamp  # noqa: E402

CASE = Path(__file__).resolve().parent / "data3d" / "mmdef3d"
OUT = RESULTS / "deformable3d_cost.json"


def stage(transform: dict, points: int, iterations: int) -> dict:
    return {
        "transform": transform,
        "metric": {"kind": "mattes", "number_of_histogram_bins": 32},
        "sampling": {"strategy": "random", "points": points},
        "optimizer": {
            "kind": "gradient_descent",
            "number_of_iterations": iterations,
            "estimate_learning_rate": "once",
            "convergence_minimum_value": 1e-300,  # never converges: exactly ``iterations`` iterations
            "convergence_window_size": 2,
        },
        "pyramid": {"shrink_factors": [1], "smoothing_sigmas": [0.0], "sigma_units": "voxel", "shrink_images": True},
    }


def seconds(pair, transform: dict, points: int, iterations: int, threads: int) -> float:
    from autoreg.recipe import recipe_from_dict
    from autoreg.registration import register

    recipe = recipe_from_dict(
        {
            "autoreg_recipe": 2,
            "initializer": {"kind": "geometry"},
            "stages": [stage(transform, points, iterations)],
            "threads": threads,
            "seed": 1,
        }
    )
    t0 = time.perf_counter()
    register(recipe, pair)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (CASE / "pair.yaml").is_file():
        print(f"{CASE} is missing: run python benchmarks/make_3d_set.py --only mmdef3d first")
        return 0
    from autoreg.config import load_config
    from autoreg.pipeline import Pipeline

    pair = Pipeline(load_config(CASE / "pair.yaml")).pairs[0]
    voxels = pair.fixed.GetNumberOfPixels()
    cases = [
        ("bspline", {"kind": "bspline", "mesh_size": [m] * 3}, 3 * (m + 3) ** 3, n)
        for m in (4, 8, 12)
        for n in (5_000, 20_000)
    ] + [
        ("displacement", {"kind": "displacement", "grid_spacing": g}, None, n)
        for g in (2.0,)
        for n in (5_000, 20_000, 80_000)
    ]
    print(f"# deformable3d_cost: mmdef3d full resolution, {args.threads} threads ({stamp()}, {machine()})")
    print("| transform | grid | parameters | samples | s per iteration | ns per sample x parameter |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    for kind, transform, params, points in cases:
        short = seconds(pair, transform, points, 2, args.threads)
        long = seconds(pair, transform, points, 12, args.threads)
        per_iteration = max(long - short, 0.0) / 10
        grid = (
            f"mesh {transform['mesh_size'][0]}^3"
            if kind == "bspline"
            else f"every {transform['grid_spacing']:g} voxels"
        )
        if params is None:  # a field's parameters: its voxels on the grid, times the dimension
            params = 3 * int(voxels / transform["grid_spacing"] ** 3)
        ns = 1e9 * per_iteration / (points * params)
        rows.append(
            {"kind": kind, "grid": grid, "parameters": params, "samples": points, "s_per_iteration": per_iteration}
        )
        print(f"| {kind} | {grid} | {params} | {points} | {per_iteration:.3f} | {ns:.3g} |", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"threads": args.threads, "machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
