"""What pruning saves (issue 3 item 5, issue 6 item 3), measured on the same recipes.

    python benchmarks/pruning.py [--pair cima_lunglesion3_he_ki67] [--stages affine] [--trials 30]

1. ``free``: a study with no pruning and no per-trial time limit draws N recipes and runs every one to the end.
2. ``pruner``: the same N recipes replayed (enqueued, same trial numbers, so the same seeds) with the pruner on and
   still no time limit: what the per-level pruner alone saves.
3. ``default``: the same recipes with autoreg's defaults: pruner and the automatic per-trial time limit.

All with --jobs 1 and one ITK thread, so a replayed trial does exactly the registration of the free one until it
is stopped. Reported: registration seconds (sum over trials) against the free run, and the best TRE each run keeps
(equal when the best recipe was never stopped).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import studyinfo  # noqa: E402
from common import REPO, machine, require_shared_data, stamp, tune, write_pair_yaml  # noqa: E402

from autoreg.recipe import recipe_from_dict, save_recipe  # noqa: E402

NO_LIMIT_S = 1e6


def run(out: Path, label: str, name: str, stages: list[str], trials: int, **extra) -> dict:
    pair = write_pair_yaml(out / label, name, stages, deterministic=True, **extra)
    study_dir = out / f"study-{label}"
    shutil.rmtree(study_dir, ignore_errors=True)
    _, wall = tune(pair, study_dir, trials, 1)
    study = studyinfo.load(study_dir, pair.stem)
    fig = studyinfo.figures(study)
    fig["wall_s"] = wall
    fig["study"] = study
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="cima_lunglesion3_he_ki67")
    ap.add_argument("--stages", default="affine")
    ap.add_argument("--trials", type=int, default=30)
    args = ap.parse_args()
    require_shared_data()
    out = REPO / "benchmarks" / "results" / "pruning"
    shutil.rmtree(out, ignore_errors=True)
    stages = args.stages.split("+")
    free = run(out, "free", args.pair, stages, args.trials, prune=False, trial_timeout=NO_LIMIT_S)
    recipes = []
    for t in sorted(free["study"].get_trials(deepcopy=False), key=lambda t: t.number)[1:]:  # trial 0: the baseline
        path = out / "recipes" / f"trial{t.number:03d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe_from_dict(t.user_attrs["recipe"]), path)
        recipes.append(str(path))
    pruner = run(out, "pruner", args.pair, stages, args.trials, prune=True, trial_timeout=NO_LIMIT_S, enqueue=recipes)
    default = run(out, "default", args.pair, stages, args.trials, prune=True, enqueue=recipes)
    print(
        f"# pruning: {args.pair} [{args.stages}], the same {args.trials} recipes three ways, --jobs 1, 1 thread "
        f"({stamp()}, {machine()})"
    )
    for label, f in (
        ("no pruning, no time limit", free),
        ("pruner, no time limit", pruner),
        ("pruner + time limit (default)", default),
    ):
        print(
            f"{label:30s}: best {f['best']:.4g} (trial {f['best_trial']}), stopped {f['pruned']}, failed "
            f"{f['failed']}, registration {f['registration_s']:7.1f} s = {f['registration_s'] / free['registration_s']:.3f} "
            f"of the free run, wall {f['wall_s']:.1f} s"
        )
    print(
        f"best TRE kept: pruner {pruner['best'] / free['best']:.3f}, default {default['best'] / free['best']:.3f} "
        f"of the free run's best"
    )


if __name__ == "__main__":
    main()
