"""Issue 3's benchmark: tune every pair of ../shared/data with its fitting stages and compare with the default.

    python benchmarks/tune_all.py [--trials 60] [--jobs 2] [--only SUBSTRING] [--stages affine+bspline]
                                  [--timeout-3d SECONDS] [--report]

Per pair and stage list: mean TRE of the default recipe (trial 0) and of the best after N trials, failed and pruned
counts, and the trial at which the best came within 10 % of its final value. Results also go to
benchmarks/results/tune_all.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import studyinfo  # noqa: E402
from common import REPO, machine, pair_files, require_shared_data, selected, stamp, tune, write_pair_yaml  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="run only pairs whose name contains this")
    ap.add_argument("--stages", default="", help="run only this stage list, e.g. affine+bspline")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--report", action="store_true", help="only print the table from the studies already run")
    ap.add_argument(
        "--timeout-3d",
        type=int,
        default=0,
        help="tune --timeout for the 3D pair (0: none); its trials take minutes each on 2 cores",
    )
    args = ap.parse_args()
    require_shared_data()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "tune_all.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    print(f"# tune_all: {args.trials} trials, --jobs {args.jobs} ({stamp()}, {machine()})")
    print(HEADER)
    for name, stages in selected(args.only, args.stages):
        pair = write_pair_yaml(out / "pairs", name, stages)
        study_dir = out / "studies" / pair.stem
        key = f"{name}:{'+'.join(stages)}"
        if args.report:
            if study_dir.exists() and key in results:
                fig = {**results[key], **studyinfo.figures(studyinfo.load(study_dir, pair.stem))}
                print(row(name, stages, fig))
            continue
        if study_dir.exists():
            import shutil

            shutil.rmtree(study_dir)
        limit = ["--timeout", str(args.timeout_3d)] if args.timeout_3d and is_3d(name) else []
        proc, wall = tune(pair, study_dir, args.trials, args.jobs, *limit, check=False)
        if proc.returncode != 0:
            print(f"{name:34s} {'+'.join(stages):15s} tune failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        fig = studyinfo.figures(studyinfo.load(study_dir, pair.stem))
        fig["wall_s"] = wall
        fig["trials_per_min"] = fig["trials"] / wall * 60
        results[key] = fig
        results_path.write_text(json.dumps(results, indent=2))
        print(row(name, stages, fig), flush=True)


def is_3d(name: str) -> bool:
    return pair_files(name)["fixed"].name.endswith(".nii.gz")


HEADER = (
    f"{'pair':34s} {'stages':15s} {'default':>8s} {'tuned':>9s} {'ratio':>6s} {'fail':>4s} {'prune':>5s} "
    f"{'@10%':>5s} {'@gain':>5s} {'t/min':>6s} {'min':>6s}"
)


def row(name: str, stages: list[str], fig: dict) -> str:
    base = fig["baseline"]
    ratio = f"{fig['best'] / base:.3f}" if base and fig["best"] is not None else "-"
    return (
        f"{name:34s} {'+'.join(stages):15s} {_f(base):>8s} {_f(fig['best']):>9s} {ratio:>6s} "
        f"{fig['failed']:>4d} {fig['pruned']:>5d} {str(fig['within_10pct_at_trial']):>5s} "
        f"{str(fig.get('within_10pct_of_gain_at_trial')):>5s} {fig['trials_per_min']:>6.1f} {fig['wall_s'] / 60:>6.1f}"
    )


def _f(v) -> str:
    return "FAIL" if v is None else f"{v:.3g}"


if __name__ == "__main__":
    main()
