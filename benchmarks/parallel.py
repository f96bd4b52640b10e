"""Trials per minute at --jobs 1 and --jobs 2 on the same recipes (issue 3 and 6: parallel efficiency).

    python benchmarks/parallel.py [--pair cima_lunglesion3_he_ki67] [--stages affine] [--trials 24]

A first study (--jobs 1, one ITK thread) draws N recipes; the others run exactly those recipes (enqueued), with
pruning off in all, so all do the same registrations: --jobs 2 with one thread each (parallel efficiency =
speed-up / 2), and --jobs 1 with all cores as ITK threads (what a single process gets from threads alone).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import studyinfo  # noqa: E402
from common import REPO, machine, require_shared_data, stamp, write_pair_yaml  # noqa: E402
from common import tune as run_tune  # noqa: E402

from autoreg.recipe import recipe_from_dict, save_recipe  # noqa: E402


def tune(pair: Path, study_dir: Path, trials: int, jobs: int) -> float:
    if study_dir.exists():
        shutil.rmtree(study_dir)
    return run_tune(pair, study_dir, trials, jobs)[1]


def measure(
    out: Path, name: str, stages: list[str], trials: int, jobs: int, one_thread: bool, recipes: list[str] | None
) -> tuple[dict, float, list[str]]:
    """One study; the first one draws recipes, the others replay exactly those (enqueued, same trial numbers)."""
    extra = {"prune": False, "deterministic": one_thread}
    if recipes:
        extra["enqueue"] = recipes
    label = f"jobs{jobs}-{'1thread' if one_thread else 'threads'}"
    pair = write_pair_yaml(out / label, name, stages, **extra)
    wall = tune(pair, out / f"study-{label}", trials, jobs)
    study = studyinfo.load(out / f"study-{label}", pair.stem)
    drawn = []
    if recipes is None:
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)[1:]:  # trial 0 is enqueued anyway
            path = out / "recipes" / f"trial{t.number:03d}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe_from_dict(t.user_attrs["recipe"]), path)
            drawn.append(str(path))
    return studyinfo.figures(study), wall, drawn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pair", default="cima_lunglesion3_he_ki67")
    ap.add_argument("--stages", default="affine")
    ap.add_argument("--trials", type=int, default=24)
    args = ap.parse_args()
    require_shared_data()
    out = REPO / "benchmarks" / "results" / "parallel"
    shutil.rmtree(out, ignore_errors=True)
    stages = args.stages.split("+")
    f1, w1, recipes = measure(out, args.pair, stages, args.trials, 1, True, None)
    f2, w2, _ = measure(out, args.pair, stages, args.trials, 2, True, recipes)
    ft, wt, _ = measure(out, args.pair, stages, args.trials, 1, False, recipes)
    print(
        f"# parallel: {args.pair} [{args.stages}], {args.trials} identical recipes, pruning off ({stamp()}, {machine()})"
    )
    for label, f, w in (
        ("jobs 1 x 1 ITK thread ", f1, w1),
        ("jobs 2 x 1 ITK thread ", f2, w2),
        ("jobs 1 x all ITK threads", ft, wt),
    ):
        print(
            f"{label}: {f['trials']} trials in {w:6.1f} s = {f['trials'] / w * 60:6.2f} trials/min "
            f"(sum of registration time {f['registration_s']:.1f} s)"
        )
    tpm1, tpm2, tpmt = (f["trials"] / w for f, w in ((f1, w1), (f2, w2), (ft, wt)))
    print(f"speed-up jobs 2 / jobs 1 (1 thread each) = {tpm2 / tpm1:.2f}; parallel efficiency = {tpm2 / tpm1 / 2:.2f}")
    print(f"jobs 2 x 1 thread against jobs 1 x all threads (same cores) = {tpm2 / tpmt:.2f}")
    print(f"per-trial overhead at jobs 1: wall / sum of registration time = {w1 / f1['registration_s']:.3f}")


if __name__ == "__main__":
    main()
