"""Issue 13's figures: the deformable stage on the histology pairs, against elastix's BSpline and ANTs' SyN.

    pip install -e ".[bench]"
    python benchmarks/deformable.py [--only ki67] [--trials 60] [--jobs 2] [--timeout 300] [--timeout-3d 600] [--no-3d]
    python benchmarks/deformable.py --report

Per histology pair of ../shared/data:

1. ``autoreg tune`` with ``stages: [affine, deformable]`` (each trial's deformable kind is searched: bspline,
   displacement or demons), ``--trials N --jobs J --timeout S --seed 0``;
2. its best trial's recipe run once more here as the study ran it (its threads and seed; ``--rerun`` repeats only
   this step), and once with 2 ITK threads like the peers: mean TRE over every landmark, the folding fraction and
   the seconds of that one registration;
3. elastix (default affine + bspline maps) and ANTsPy SyN on the same pair with 2 threads (``peers.py``'s isolated
   runs), scored by the same code;
4. the affine floor: the mean residual of the least-squares affine fit of the landmarks themselves, what no affine
   registration can beat.

Then per 3D case (afids, ../shared/data's 3D pair, and the 3D set's mmdef3d; ``make_3d_set.py`` builds them when
missing; ``--no-3d`` leaves them out): ``tune3d.py``'s study with ``[affine, displacement]`` (``--timeout-3d``), its
best recipe exported and run once more on 2 threads over every landmark (TRE in mm, folding, seconds), ANTs
``SyNOnly`` after its linear stages, and ``peers3d.py``'s elastix and SyN on the case, 2 threads.

Results go to ``benchmarks/results/deformable.json``, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HISTOLOGY, RESULTS, machine, require_shared_data, stamp, tune, write_pair_yaml  # noqa: E402

STAGES = ["affine", "deformable"]
#: The 3D cases: afids (../shared/data's 3D pair) and the 3D set's deformed one (make_3d_set.py builds both).
CASES_3D = ("afids", "mmdef3d")
STAGES_3D = "affine+displacement"
OUT = RESULTS / "deformable.json"


def affine_floor(pair) -> float:
    """Mean residual of the least-squares affine map from fixed to moving landmarks (physical units)."""
    f, m = pair.fixed_points, pair.moving_points
    design = np.hstack([f, np.ones((len(f), 1))])
    coef, *_ = np.linalg.lstsq(design, m, rcond=None)
    return float(np.linalg.norm(design @ coef - m, axis=1).mean())


def rerun_best(pair, recipe, threads: int | None = None) -> dict:
    """The tuned recipe once more, as the study ran it (its own threads and seed) or with ``threads``: TRE over every
    landmark, folding, seconds of the registration."""
    from autoreg.registration import register
    from autoreg.scoring import folding_fraction, transform_points, tre_stats

    if threads is not None:
        recipe = recipe.with_(threads=threads)
    t0 = time.perf_counter()
    result = register(recipe, pair)
    seconds = time.perf_counter() - t0
    stats = tre_stats(transform_points(result.transform, pair.fixed_points) - pair.moving_points, pair.fixed)
    return {
        "mean": stats.mean,
        "median": stats.median,
        "p90": stats.p90,
        "seconds": seconds,
        "threads": recipe.effective_threads,
        "folding": folding_fraction(result.transform, pair.fixed),
    }


def syn_after_linear(pair, recipe, threads: int = 2) -> dict:
    """ANTs SyN alone (``SyNOnly``) started where the tuned recipe's linear stages end, and that linear result by
    itself: how far a peer's deformable step gets from the same start (TRE over every landmark)."""
    from autoreg.registration import LINEAR_KINDS, register

    linear = recipe.with_(stages=[s for s in recipe.model_dump()["stages"] if s["transform"]["kind"] in LINEAR_KINDS])
    return syn_from(pair, register(linear, pair).transform, threads)


def resampled_through(pair, lin):
    """The moving image on the fixed grid through ``lin``, outside filled with its border's median (the background)."""
    import SimpleITK as sitk

    moving = sitk.GetArrayViewFromImage(pair.moving)
    edge = np.concatenate([moving[0].ravel(), moving[-1].ravel(), moving[:, 0].ravel(), moving[:, -1].ravel()])
    return sitk.Resample(pair.moving, pair.fixed, lin, sitk.sitkLinear, float(np.median(edge)), sitk.sitkFloat32)


def syn_from(pair, lin, threads: int = 2) -> dict:
    """ANTs ``SyNOnly`` on the moving image resampled through the linear transform ``lin`` (fixed -> moving points):
    the TRE over every landmark of ``lin`` alone (``linear_mean``) and of SyN's field after it (``mean``)."""
    import tempfile

    import SimpleITK as sitk
    from peer_tools import run_ants

    from autoreg.scoring import transform_points, tre_stats

    warped = resampled_through(pair, lin)
    with tempfile.TemporaryDirectory() as tmp:
        sitk.WriteImage(sitk.Cast(pair.fixed, sitk.sitkFloat32), f"{tmp}/fixed.nii.gz")
        sitk.WriteImage(warped, f"{tmp}/warped.nii.gz")
        mapped, seconds = run_ants(
            Path(tmp) / "fixed.nii.gz",
            Path(tmp) / "warped.nii.gz",
            pair.fixed_points,
            STAGES,
            threads=threads,
            transform_type="SyNOnly",
        )

    def mean(points: np.ndarray) -> float:
        return tre_stats(transform_points(lin, points) - pair.moving_points, pair.fixed).mean

    return {"linear_mean": mean(pair.fixed_points), "mean": mean(mapped), "seconds": seconds, "threads": threads}


def rerun(row: dict) -> None:
    """Both reruns of a saved pair's best trial: as recorded (``tuned``) and with 2 threads like the peers."""
    import peers

    from autoreg.recipe import recipe_from_dict

    best = peers.study_best(RESULTS / "deformable" / row["pair"] / "study", f"{row['pair']}-{'-'.join(STAGES)}")
    if best is None:
        return
    pair = peers.load(row["pair"], STAGES)
    recipe = recipe_from_dict(best.recipe)
    row["tuned"] = rerun_best(pair, recipe)
    row["tuned_2_threads"] = rerun_best(pair, recipe, threads=2)
    row["syn_after_linear"] = syn_after_linear(pair, recipe)


def one_pair(name: str, trials: int, jobs: int, timeout: float) -> dict:
    import peers
    import studyinfo

    from autoreg.trial import best_and_baseline, records

    folder = RESULTS / "deformable" / name
    shutil.rmtree(folder, ignore_errors=True)  # a fresh study: tune would resume an earlier one
    pair_yaml = write_pair_yaml(folder, name, STAGES)
    proc, wall = tune(pair_yaml, folder / "study", trials, jobs, "--timeout", str(timeout), check=False)
    study_name = f"{name}-{'-'.join(STAGES)}"
    trials_ = records(studyinfo.load(folder / "study", study_name))
    best, base = best_and_baseline(trials_)
    pair = peers.load(name, STAGES)
    row: dict = {
        "pair": name,
        "wall_s": round(wall, 1),
        "exit": proc.returncode,
        "trials": sum(t.state in ("COMPLETE", "PRUNED", "FAIL") for t in trials_),
        "complete": sum(t.state == "COMPLETE" for t in trials_),
        "affine_floor": affine_floor(pair),
        "default": base.value if base else None,
    }
    if best is not None:
        row.update(
            best_trial=best.number,
            best_kinds=[s["transform"]["kind"] for s in best.recipe["stages"]],
            best_selected=best.tre_mean,
            best_honest=best.tre_report_mean,
            best_folding_in_study=best.folding_fraction,
            best_seconds_in_study=best.runtime_s,
        )
        rerun(row)
    for tool in ("elastix", "ants"):
        row[tool] = peers.run_isolated(tool, name, STAGES, threads=2, timeout=900)
    return row


def one_case_3d(case: str, trials: int, jobs: int, timeout: float) -> dict:
    """A 3D case (``tune3d``'s study with ``[affine, displacement]``, the 3D answer: a study that may choose bspline
    keeps paying for the default's dense BSpline gradient), its best recipe exported and run once more on 2 threads
    over every landmark, SyN's step from its linear stages, and the peers on the same case (``peers3d``)."""
    import make_3d_set
    import peers3d
    import tune3d

    from autoreg.pipeline import Pipeline
    from autoreg.recipe import load_recipe

    data = make_3d_set.ensure(tune3d.DATA3D, case)
    study = tune3d.tune_case(case, trials=trials, jobs=jobs, timeout=timeout, prune=True, stages=STAGES_3D)
    folder = RESULTS / "tune3d" / f"{case}-{study['variant']}"
    row: dict = {
        "pair": case,
        "dim": 3,
        "wall_s": study["wall_s"],
        "exit": study["exit"],
        "trials": study["trials"],
        "default": study["baseline"],
        "best_selected": study["best"],
        "best_honest": study["honest"],
        "best_kinds": STAGES_3D.split("+"),
    }
    best = tune3d.export_best(folder)
    if best is not None:  # one run over every landmark gives TRE, folding and seconds
        pair = Pipeline.load(folder / "pair.yaml").all_landmark_pairs[0]
        recipe = load_recipe(best)
        row["tuned"] = rerun_best(pair, recipe, threads=2)
        row["syn_after_linear"] = syn_after_linear(pair, recipe)
        row["affine_floor"] = affine_floor(pair)
    for tool in ("elastix", "ants"):
        row[tool] = peers3d.run_isolated(tool, data, threads=2, timeout=900)
    return row


def _f(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = [
        "| pair | affine floor | default | tuned (kinds) | honest | tuned, 2 threads | elastix bspline | ANTs SyN | "
        "tuned folding | tuned s (threads) | tuned s, 2 threads | SyN s | tuned s / SyN s, 2 threads each | "
        "tuned linear stages | SyN after them | study: trials, wall min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, e, a = r.get("tuned") or {}, r.get("elastix") or {}, r.get("ants") or {}
        t2, sl = r.get("tuned_2_threads") or {}, r.get("syn_after_linear") or {}
        kinds = "+".join(k for k in r.get("best_kinds", []))
        # seconds compared at SyN's 2 threads (the 3D rows' tuned run already has them)
        same = t2 if t2.get("seconds") else (t if t.get("threads") == 2 else {})
        ratio = same["seconds"] / a["seconds"] if same.get("seconds") and a.get("seconds") else None
        lines.append(
            f"| {r['pair']}{' (mm)' if r.get('dim') == 3 else ''} | {_f(r.get('affine_floor'))} | {_f(r['default'])} | {_f(t.get('mean'))} ({kinds}) | "
            f"{_f(r.get('best_honest'))} | {_f(t2.get('mean'))} | "
            f"{_f(e.get('mean')) if 'mean' in e else e.get('failed', '-')} | "
            f"{_f(a.get('mean')) if 'mean' in a else a.get('failed', '-')} | "
            f"{_f(100 * t['folding'], '.3f') + ' %' if t.get('folding') is not None else '-'} | "
            f"{_f(t.get('seconds'))} ({t.get('threads', '-')}) | {_f(same.get('seconds'))} | {_f(a.get('seconds'))} | "
            f"{_f(ratio, '.2f')} | "
            f"{_f(sl.get('linear_mean'))} | {_f(sl.get('mean'))} | {r['trials']}, {r['wall_s'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="tune --timeout per pair")
    parser.add_argument("--timeout-3d", type=float, default=600.0, help="tune --timeout per 3D case")
    parser.add_argument("--no-3d", action="store_true", help="the histology pairs only")
    parser.add_argument("--report", action="store_true", help="only print the table of the saved results")
    parser.add_argument("--rerun", action="store_true", help="only run the saved studies' best recipes again")
    args = parser.parse_args()
    saved = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.rerun:
        for row in saved.values():
            if args.only in row["pair"] and row.get("dim") != 3:
                rerun(row)
        OUT.write_text(json.dumps(saved, indent=2), encoding="utf-8")
    elif not args.report:
        require_shared_data()
        print(
            f"# deformable: [affine, deformable], {args.trials} trials, --jobs {args.jobs}, --timeout "
            f"{args.timeout:g} per pair ({stamp()}, {machine()})",
            flush=True,
        )
        for name in HISTOLOGY:
            if args.only in name:
                saved[name] = one_pair(name, args.trials, args.jobs, args.timeout)
                OUT.parent.mkdir(parents=True, exist_ok=True)
                OUT.write_text(json.dumps(saved, indent=2), encoding="utf-8")
                print(table([saved[name]]).splitlines()[-1], flush=True)
        for case in () if args.no_3d else CASES_3D:
            if args.only in case:
                saved[case] = one_case_3d(case, args.trials, args.jobs, args.timeout_3d)
                OUT.write_text(json.dumps(saved, indent=2), encoding="utf-8")
                print(table([saved[case]]).splitlines()[-1], flush=True)
    print(table(list(saved.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
