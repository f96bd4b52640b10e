"""Issue 14's figures: recipes on pairs their study never saw, and what a warm start saves.

    python benchmarks/crossval_loo.py [--only histology,translation] [--trials 40] [--jobs 2] [--across relative]
    python benchmarks/crossval_loo.py --report

Per dataset of ../shared/data (the four histology pairs, stages [affine]; the two translation pairs, [rigid]):

1. ``autoreg crossval DATASET.yaml --trials N --jobs J`` (leave-one-out): each pair's out-of-sample TRE over every
   landmark, the SimpleITK default's and the pair's own study's best (in sample);
2. elastix's and ANTs' defaults on each pair (``peers.py``'s isolated runs, 2 threads), scored by the same code;
3. warm starts: each pair tuned again, starting from the best recipe of the fold study that did not see it
   (``--warm-start``), against its own cold study from step 1: the trials each needed to come within 10 % of the
   better of the two final bests.

``--across mean`` runs the same with ``across_pairs: mean`` (the plain mean over pairs instead of each pair's TRE
relative to its own before registration), to compare the two aggregates out of sample (after a ``relative`` run it
reuses that run's own studies, peers and warm starts). Results go to
``benchmarks/results/crossval_loo.json``; the tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HISTOLOGY, RESULTS, machine, pair_files, require_shared_data, stamp, tune  # noqa: E402

DATASETS = {
    "histology": (HISTOLOGY, ["affine"]),
    "translation": (["itk_brain_pd_shift13x17", "itk_brain_t1_pd_shift13x17"], ["rigid"]),
}
#: Within this fraction of the final best (issue 14's measure of what a warm start saves).
NEAR = 0.10


def dataset_yaml(folder: Path, name: str, pairs: list[str], stages: list[str], across: str) -> Path:
    doc = {"name": name, "stages": stages, "objective": {"across_pairs": across}, "pairs": []}
    for p in pairs:
        f = pair_files(p)
        doc["pairs"].append(
            {
                "name": p,
                "fixed": str(f["fixed"]),
                "moving": str(f["moving"]),
                "landmarks": {"fixed": str(f["fixed_landmarks"]), "moving": str(f["moving_landmarks"])},
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def study_records(study_dir: Path):
    """The trial records of the one study in ``study_dir``."""
    import studyinfo

    from autoreg.trial import records

    name = json.loads((study_dir / "study.json").read_text())["name"]
    return records(studyinfo.load(study_dir, name))


def trials_to_near(values: list[float | None], target: float) -> int | None:
    """1-based number of trials run until one came within ``NEAR`` of ``target`` (None: never)."""
    for i, v in enumerate(values, 1):
        if v is not None and v <= (1 + NEAR) * target:
            return i
    return None


def warm_starts(out: Path, folds: list[list[str]], trials: int, jobs: int) -> list[dict]:
    """Each pair tuned from the fold study's best recipe that never saw it, against its cold own study."""
    from autoreg.recipe import recipe_from_dict, save_recipe
    from autoreg.trial import best_and_baseline

    rows = []
    for i, held in enumerate(folds):
        best, _ = best_and_baseline(study_records(out / f"fold{i + 1}" / "study"))
        if best is None:
            continue
        recipe = out / f"fold{i + 1}" / "best.yaml"
        save_recipe(recipe_from_dict(best.recipe), recipe)
        for n in held:
            own = out / f"own-{n}"
            warm = out / f"warm-{n}"
            proc, wall = tune(own / "pair.yaml", warm / "study", trials, jobs, "--warm-start", str(recipe), check=False)
            cold_v = [t.value if t.complete else None for t in study_records(own / "study")]
            warm_v = [t.value if t.complete else None for t in study_records(warm / "study")]
            target = min(v for v in cold_v + warm_v if v is not None)
            rows.append(
                {
                    "pair": n,
                    "target": target,
                    "cold_best": min(v for v in cold_v if v is not None),
                    "warm_best": min((v for v in warm_v if v is not None), default=None),
                    "cold_trials": trials_to_near(cold_v, target),
                    "warm_trials": trials_to_near(warm_v, target),
                    "warm_wall_s": round(wall, 1),
                    "exit": proc.returncode,
                }
            )
    return rows


def peers(pairs: list[str], stages: list[str]) -> dict[str, dict]:
    import peers as peers_mod

    return {p: {tool: peers_mod.run_isolated(tool, p, stages, 2, 1800) for tool in ("elastix", "ants")} for p in pairs}


def run(key: str, trials: int, jobs: int, across: str, saved: dict) -> dict:
    pairs, stages = DATASETS[key]
    label = f"{key}-{across}"
    out = RESULTS / "crossval" / label
    path = dataset_yaml(out, label, pairs, stages, across)
    cmd = [
        sys.executable,
        "-m",
        "autoreg.cli",
        "crossval",
        str(path),
        "--trials",
        str(trials),
        "--jobs",
        str(jobs),
        "--seed",
        "0",
        "--out",
        str(out),
        "--json",
        str(out / "result.json"),
    ]
    # the aggregate's own comparison needs only the out-of-sample scores: the relative run's own studies, peers and
    # warm starts stand for both
    other = saved.get(f"{key}/relative") if across == "mean" else None
    if other is not None:
        cmd.append("--no-own")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"crossval failed: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads((out / "result.json").read_text())
    return {
        "dataset": key,
        "across": across,
        "stages": stages,
        "trials": trials,
        "stamp": stamp(),
        "machine": machine(),
        "command": " ".join(cmd[1:]),
        "crossval": result,
        "text": proc.stdout,
        "peers": other["peers"] if other else peers(pairs, stages),
        "warm": [] if other else warm_starts(out, result["folds"], trials, jobs),
    }


def _f(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def table(entry: dict) -> str:
    cv = entry["crossval"]
    lines = [
        f"### {entry['dataset']} ({'+'.join(entry['stages'])}, across_pairs {entry['across']}, "
        f"{entry['trials']} trials per study; TRE over every landmark, {cv['unit']})",
        "",
        "| pair | before | default | **out of sample** | own study's best | elastix | ANTs | out of sample vs "
        "default, best peer |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in cv["pairs"]:
        peer = entry["peers"].get(p["name"], {})
        el, an = (peer.get(t, {}).get("mean") for t in ("elastix", "ants"))
        best_peer = min((v for v in (el, an) if v is not None), default=None)
        oos = p["out_of_sample"]
        verdict = (
            "-"
            if oos is None
            else (
                f"{'not worse' if p['default'] is not None and oos <= p['default'] else 'WORSE'} / "
                f"{'below' if best_peer is not None and oos < best_peer else 'not below'}"
            )
        )
        lines.append(
            f"| {p['name']} | {_f(p['before'])} | {_f(p['default'])} | **{_f(oos)}** | {_f(p['own_best'])} | "
            f"{_f(el)} | {_f(an)} | {verdict} |"
        )
    if entry["warm"]:
        lines += [
            "",
            f"Warm starts: trials until within {NEAR:.0%} of the better final best (cold: the pair's own "
            "study; warm: the same study started from the fold's best recipe).",
            "",
            "| pair | target | cold best | warm best | cold: trials | warm: trials |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for w in entry["warm"]:
            lines.append(
                f"| {w['pair']} | {_f(w['target'])} | {_f(w['cold_best'])} | {_f(w['warm_best'])} | "
                f"{w['cold_trials'] or 'never'} | {w['warm_trials'] or 'never'} |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(DATASETS))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--across", default="relative", choices=("relative", "mean"))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    path = RESULTS / "crossval_loo.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if not args.report:
        require_shared_data()
        for key in args.only.split(","):
            entry = run(key, args.trials, args.jobs, args.across, saved)
            saved[f"{key}/{args.across}"] = entry
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=2), encoding="utf-8")
            print(table(entry), "\n", flush=True)
    else:
        for entry in saved.values():
            print(table(entry), "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
