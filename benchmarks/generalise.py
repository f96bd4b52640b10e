"""Generalisation (issue 4, and row (e) of issue 6): tune one recipe on three histology pairs, score it on the fourth.

    python benchmarks/generalise.py [--trials 40] [--jobs 2] [--stages affine]

For each choice of the held-out pair: a study over the other three (`pairs:`) with the fourth under `holdout:`;
its best recipe is then run on the held-out pair. Compared with the default recipe and, when
benchmarks/results/tune_all.json has it, with tuning on the held-out pair itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import studyinfo  # noqa: E402
from common import HISTOLOGY, REPO, machine, pair_files, require_shared_data, stamp, tune  # noqa: E402

from autoreg.config import load_config  # noqa: E402
from autoreg.data import load_pair  # noqa: E402
from autoreg.evaluate import evaluate  # noqa: E402
from autoreg.recipe import default_recipe, recipe_from_dict  # noqa: E402


def entry(name: str) -> dict:
    f = pair_files(name)
    return {
        "name": name,
        "fixed": str(f["fixed"]),
        "moving": str(f["moving"]),
        "landmarks": {"fixed": str(f["fixed_landmarks"]), "moving": str(f["moving_landmarks"])},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--stages", default="affine")
    args = ap.parse_args()
    require_shared_data()
    stages = args.stages.split("+")
    out = REPO / "benchmarks" / "results" / "generalise"
    out.mkdir(parents=True, exist_ok=True)
    own = {}
    tune_all = REPO / "benchmarks" / "results" / "tune_all.json"
    if tune_all.exists():
        own = json.loads(tune_all.read_text())
    results = {}
    print(
        f"# generalise: tune on 3 histology pairs, score the 4th; {args.trials} trials [{args.stages}] ({stamp()}, {machine()})"
    )
    print(
        f"{'held-out pair':34s} {'default':>8s} {'tuned on self':>14s} {'tuned on other 3':>17s} {'other 3 (in study)':>19s}"
    )
    for held in HISTOLOGY:
        others = [n for n in HISTOLOGY if n != held]
        name = f"gen-{held}-{'-'.join(stages)}"
        doc = {"name": name, "pairs": [entry(n) for n in others], "holdout": [entry(held)], "stages": stages}
        pair_yaml = out / f"{name}.yaml"
        pair_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
        study_dir = out / "studies" / name
        shutil.rmtree(study_dir, ignore_errors=True)
        tune(pair_yaml, study_dir, args.trials, args.jobs)
        study = studyinfo.load(study_dir, name)
        best = studyinfo.figures(study)
        best_trial = min((t for t in study.get_trials(deepcopy=False) if t.value is not None), key=lambda t: t.value)
        cfg = load_config(pair_yaml)
        held_pair = [load_pair(cfg.holdout[0])]
        tuned = evaluate(recipe_from_dict(best_trial.user_attrs["recipe"]), held_pair, repeats=3).pairs[0].spread
        default = evaluate(default_recipe(stages, 2), held_pair, repeats=3).pairs[0].spread
        self_fig = own.get(f"{held}:{'+'.join(stages)}", {})
        results[held] = {
            "default": default,
            "tuned_on_others": tuned,
            "tuned_on_self": self_fig.get("best"),
            "study_best_on_others": best["best"],
        }
        (out / "generalise.json").write_text(json.dumps(results, indent=2))
        print(
            f"{held:34s} {_f(default['mean']):>8s} {_f(self_fig.get('best')):>14s} "
            f"{_f(tuned['mean']) + ' +-' + _f(tuned['std']):>17s} {_f(best['best']):>19s}",
            flush=True,
        )


def _f(v) -> str:
    return "-" if v is None else f"{v:.3g}"


if __name__ == "__main__":
    main()
