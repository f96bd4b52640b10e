"""Trials per minute at --jobs 1 and --jobs 2 on the same recipes (issue 3 and 6: parallel efficiency).

    python benchmarks/parallel.py [--pair cima_lunglesion3_he_ki67] [--stages affine] [--trials 24]

A first study at --jobs 1 draws N recipes; a second study at --jobs 2 runs exactly those recipes (enqueued), with
pruning off in both, so both do the same registrations and the ratio of their trials per minute is the parallel
speed-up (efficiency = speed-up / 2).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import studyinfo  # noqa: E402
from common import REPO, machine, require_shared_data, stamp, write_pair_yaml  # noqa: E402

from autoreg.recipe import recipe_from_dict, save_recipe  # noqa: E402


def tune(pair: Path, study_dir: Path, trials: int, jobs: int) -> float:
    if study_dir.exists():
        shutil.rmtree(study_dir)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "autoreg.cli", "tune", str(pair), "--trials", str(trials), "--jobs", str(jobs),
         "--seed", "0", "--study-dir", str(study_dir), "-q"],
        check=True, capture_output=True, text=True,
    )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pair", default="cima_lunglesion3_he_ki67")
    ap.add_argument("--stages", default="affine")
    ap.add_argument("--trials", type=int, default=24)
    args = ap.parse_args()
    require_shared_data()
    out = REPO / "benchmarks" / "results" / "parallel"
    stages = args.stages.split("+")
    first = write_pair_yaml(out, args.pair, stages, prune=False)
    wall1 = tune(first, out / "jobs1", args.trials, 1)
    study1 = studyinfo.load(out / "jobs1", first.stem)
    recipes = []
    for t in sorted(study1.get_trials(deepcopy=False), key=lambda t: t.number)[1:]:  # trial 0 is re-enqueued anyway
        path = out / "recipes" / f"trial{t.number:03d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe_from_dict(t.user_attrs["recipe"]), path)
        recipes.append(str(path))
    second = write_pair_yaml(out / "replay", args.pair, stages, prune=False, enqueue=recipes)
    wall2 = tune(second, out / "jobs2", args.trials, 2)
    f1 = studyinfo.figures(study1)
    f2 = studyinfo.figures(studyinfo.load(out / "jobs2", second.stem))
    tpm1, tpm2 = f1["trials"] / wall1 * 60, f2["trials"] / wall2 * 60
    print(f"# parallel: {args.pair} [{args.stages}], {args.trials} identical recipes ({stamp()}, {machine()})")
    print(f"jobs 1: {f1['trials']} trials in {wall1:.1f} s = {tpm1:.2f} trials/min (registrations {f1['registration_s']:.1f} s)")
    print(f"jobs 2: {f2['trials']} trials in {wall2:.1f} s = {tpm2:.2f} trials/min (registrations {f2['registration_s']:.1f} s)")
    print(f"speed-up jobs2/jobs1 = {tpm2 / tpm1:.2f}; parallel efficiency = {tpm2 / tpm1 / 2:.2f}")
    print(f"process overhead at jobs 1: wall / sum of registration time = {wall1 / f1['registration_s']:.3f}")


if __name__ == "__main__":
    main()
