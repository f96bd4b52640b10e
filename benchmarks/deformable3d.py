"""The deformable stage in 3D (issue 13): why SimpleITK's BSpline cannot be both accurate and fast, and what a
displacement field needs to be.

    python benchmarks/make_3d_set.py --only mmdef3d      # once, if benchmarks/data3d/mmdef3d is missing
    python benchmarks/deformable3d.py [--threads 2] [--part cost|levels|smoothing] [--case mmdef3d|afids]
                                      [--recipe BEST.yaml]

Part ``cost``. On mmdef3d's full-resolution level (182 x 218 x 182 voxels), one deformable stage is run for 2 and for 12 gradient
descent iterations (convergence checks off) at several sample counts and grid sizes; the difference over 10 is the
seconds of one iteration, free of the stage's setup. ITKv4's metric adds every sample's derivative over all of a
BSpline transform's parameters (its Jacobian is dense), so an iteration costs ~ samples x parameters; a displacement
field has local support (each sample touches its own few field voxels), so an iteration costs ~ samples. The
column ``ns per sample x parameter`` stays flat for BSpline if the first law holds.

Part ``levels``. One [affine, displacement] recipe on mmdef3d (Mattes MI, 100k random points, a field every 2.4
voxels, Gaussian variances 4 and 2.3: a study's best trial of round 2), its displacement pyramid and the two field
settings varied: ``gradient_step`` (None: ITK's bound of one field voxel per update) and ``across_levels``
(``continue`` one field, or ``compose`` a new one per level). TRE over every landmark (mm), seconds of the whole
registration, and each displacement level's iterations, stop and TRE.

Part ``smoothing``. A study's exported best recipe (``--recipe``; default: ``tune3d.py``'s ``[affine,
displacement]`` study's best.yaml of ``--case``, mmdef3d unless named) with its displacement stage's update
variance (``transform.variance_for_update_field``, in field voxels) replaced by each of 1, 3, 9, 16 and 32: what
the field's smoothing is worth from the study's own best affine, so how far a study that misses it lands from it. TRE over every landmark
(mm), seconds of the whole registration, and each displacement level's iterations and TRE.

Results go to ``benchmarks/results/deformable3d.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, stamp  # noqa: E402

DATA3D = Path(__file__).resolve().parent / "data3d"
CASE = DATA3D / "mmdef3d"
UPDATE_VARIANCES = (1.0, 3.0, 9.0, 16.0, 32.0)
OUT = RESULTS / "deformable3d.json"


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


AFFINE = {
    "transform": {"kind": "affine"},
    "metric": {"kind": "mattes", "number_of_histogram_bins": 32},
    "sampling": {"strategy": "regular", "points": 40_000},
    "optimizer": {"kind": "gradient_descent", "number_of_iterations": 60, "estimate_learning_rate": "once"},
    "pyramid": {
        "shrink_factors": [4, 2, 1],
        "smoothing_sigmas": [2.0, 1.0, 0.5],
        "sigma_units": "voxel",
        "shrink_images": True,
    },
}


def displacement(shrinks: list[int], step: float | None, across: str) -> dict:
    transform = {
        "kind": "displacement",
        "grid_spacing": 2.367,
        "variance_for_update_field": 3.96,
        "variance_for_total_field": 2.32,
        "gradient_step": step,
    }
    if len(shrinks) > 1:
        transform["across_levels"] = across
    return {
        "transform": transform,
        "metric": {"kind": "mattes", "number_of_histogram_bins": 44},
        "sampling": {"strategy": "random", "points": 100_000},
        "optimizer": {
            "kind": "gradient_descent",
            "number_of_iterations": 100,
            "estimate_learning_rate": "once",
            "convergence_minimum_value": 1e-7,
            "convergence_window_size": 10,
        },
        "pyramid": {
            "shrink_factors": shrinks,
            "smoothing_sigmas": [min(1.0, 0.25 * k) for k in shrinks],
            "sigma_units": "voxel",
            "shrink_images": True,
        },
    }


def scored_run(recipe, pair, stage: int) -> tuple[float, float, list[tuple[int, float]]]:
    """One registration: its mean TRE over the pair's landmarks, its seconds, and (iterations, TRE) per level of
    ``stage``."""
    from autoreg.registration import register
    from autoreg.scoring import transform_points, tre_stats

    levels: list = []
    t0 = time.perf_counter()
    result = register(recipe, pair, level_callback=lambda rec, get: levels.append(rec))
    wall = time.perf_counter() - t0
    tre = tre_stats(transform_points(result.transform, pair.fixed_points) - pair.moving_points, pair.fixed).mean
    return tre, wall, [(r.iterations, r.tre_mean) for r in levels if r.stage == stage]


def levels_part(pair, threads: int) -> list[dict]:
    from autoreg.recipe import recipe_from_dict

    cases = [
        ([4], None, "continue"),
        ([4], 0.25, "continue"),
        ([4, 4], None, "continue"),
        ([4, 4], None, "compose"),
        ([4, 2, 1], None, "continue"),
        ([4, 2, 1], 0.25, "continue"),
        ([4, 2, 1], None, "compose"),
        ([4, 2, 1], 0.25, "compose"),
    ]
    print(f"# deformable3d levels: mmdef3d [affine, displacement], {threads} threads ({stamp()}, {machine()})")
    print("| displacement levels | gradient_step | across_levels | TRE mm | s | per level: iterations, TRE |")
    print("|---|---:|---|---:|---:|---|")
    rows = []
    for shrinks, step, across in cases:
        data = {
            "autoreg_recipe": 2,
            "initializer": {"kind": "moments"},
            "threads": threads,
            "seed": 1,
            "stages": [AFFINE, displacement(shrinks, step, across)],
        }
        tre, wall, per_level = scored_run(recipe_from_dict(data), pair, stage=1)
        rows.append(
            {
                "shrinks": shrinks,
                "gradient_step": step,
                "across_levels": across,
                "tre": tre,
                "seconds": wall,
                "levels": per_level,
            }
        )
        shown = "; ".join(f"{i}, {t:.2f}" for i, t in per_level)
        print(
            f"| {shrinks} | {step if step is not None else 'ITK'} | {across if len(shrinks) > 1 else '-'} | "
            f"{tre:.3f} | {wall:.1f} | {shown} |",
            flush=True,
        )
    return rows


def smoothing_part(pair, threads: int, recipe_file: Path) -> list[dict]:
    from autoreg.recipe import load_recipe

    recipe = load_recipe(recipe_file)
    index = next(i for i, s in enumerate(recipe.stages) if s.transform.kind == "displacement")
    own = recipe.stages[index].transform.variance_for_update_field
    print(f"# deformable3d smoothing: {recipe_file}, {threads} threads ({stamp()}, {machine()})")
    print("| update variance | TRE mm | s | per level: iterations, TRE |")
    print("|---:|---:|---:|---|")
    rows = []
    for variance in sorted({own, *UPDATE_VARIANCES}):
        field = recipe.stages[index]
        field = field.model_copy(
            update={"transform": field.transform.model_copy(update={"variance_for_update_field": variance})}
        )
        stages = [*recipe.stages[:index], field, *recipe.stages[index + 1 :]]
        tre, wall, per_level = scored_run(recipe.with_(stages=stages, threads=threads), pair, stage=index)
        rows.append(
            {
                "variance_for_update_field": variance,
                "own": variance == own,
                "tre": tre,
                "seconds": wall,
                "levels": per_level,
            }
        )
        shown = "; ".join(f"{i}, {t:.2f}" for i, t in per_level)
        mark = " (the recipe's)" if variance == own else ""
        print(f"| {variance:g}{mark} | {tre:.3f} | {wall:.1f} | {shown} |", flush=True)
    return rows


def cost_part(pair, threads: int) -> list[dict]:
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
    print(f"# deformable3d cost: mmdef3d full resolution, {threads} threads ({stamp()}, {machine()})")
    print("| transform | grid | parameters | samples | s per iteration | ns per sample x parameter |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    for kind, transform, params, points in cases:
        short = seconds(pair, transform, points, 2, threads)
        long = seconds(pair, transform, points, 12, threads)
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
    return rows


def case_pair(folder: Path):
    """A 3D case's pair with every landmark (not a study's selection set)."""
    from autoreg.config import load_config
    from autoreg.pipeline import Pipeline

    return Pipeline(load_config(folder / "pair.yaml")).all_landmark_pairs[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--part", choices=("cost", "levels", "smoothing"), default=None, help="one part only (default: all)"
    )
    parser.add_argument("--case", choices=("mmdef3d", "afids"), default="mmdef3d", help="part smoothing: the 3D case")
    parser.add_argument("--recipe", type=Path, default=None, help="part smoothing: the recipe whose field varies")
    args = parser.parse_args()
    recipe = args.recipe or RESULTS / "tune3d" / f"{args.case}-prune-affine-displacement" / "best.yaml"
    saved = json.loads(OUT.read_text()) if OUT.exists() else {}
    parts = {
        "levels": lambda threads: levels_part(case_pair(CASE), threads),
        "cost": lambda threads: cost_part(case_pair(CASE), threads),
        "smoothing": lambda threads: smoothing_part(case_pair(DATA3D / args.case), threads, recipe),
    }
    for part, run in parts.items():
        if args.part not in (None, part):
            continue
        case = DATA3D / args.case if part == "smoothing" else CASE
        if not (case / "pair.yaml").is_file():
            print(f"{case} is missing: run python benchmarks/make_3d_set.py --only {case.name} first")
            continue
        if part == "smoothing" and not recipe.is_file():
            print(
                f"{recipe} is missing: run python benchmarks/tune3d.py --only {args.case} --stages affine+displacement"
            )
            continue
        saved[part if part != "smoothing" else f"smoothing-{args.case}"] = {
            "threads": args.threads,
            "machine": machine(),
            "stamp": stamp(),
            "rows": run(args.threads),
        }
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(saved, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
