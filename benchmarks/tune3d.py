"""The 3D set at workstation cost: ``autoreg tune --trials 60 --jobs 2`` on every case, against elastix and ANTs.

    python benchmarks/make_3d_set.py          # once: builds benchmarks/data3d from ../shared/data
    python benchmarks/peers3d.py              # once: elastix, ANTs and the default recipe (results/peers3d.json)
    python benchmarks/tune3d.py [--only rot3d,affine3d] [--trials 60] [--jobs 2] [--timeout 1800] [--no-prune]
                                [--stages affine+deformable]
    python benchmarks/tune3d.py --every-landmark [--only mmdef3d/prune-affine-displacement] [--within 15]
                                                   # then: each saved case's best recipe on every landmark, and
                                                   # the seconds of one registration with it on 2 threads;
                                                   # --within: the same for export --within PCT's recipe

Per case: the study's wall time, its best TRE (the landmarks it selected with) and honest TRE (those it never saw),
the peers' TRE, trials completed / pruned / failed, per-trial seconds (median, p90, max), the largest overrun of a
time limit, and the rank correlation between a trial's TRE after its coarsest level and its final TRE. Results go
to ``benchmarks/results/tune3d.json`` (one entry per case and variant), the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import studyinfo  # noqa: E402
from common import REPO, RESULTS  # noqa: E402

DATA3D = REPO / "benchmarks" / "data3d"
CASES = ("rot3d", "affine3d", "aniso3d", "mmdef3d", "afids")
CLI = [sys.executable, "-m", "autoreg.cli"]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation (ties averaged), None for fewer than 5 pairs of values."""
    if len(a) < 5:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def summarise(study, wall_s: float) -> dict:
    """The figures of one finished study (pure: reads the trial records)."""
    from autoreg.trial import best_and_baseline, records

    trials = records(study)
    best, base = best_and_baseline(trials)
    finished = [t for t in trials if t.state in ("COMPLETE", "PRUNED", "FAIL")]
    unrun = [t for t in finished if t.state == "PRUNED" and (t.pruned_at or "").startswith("predicted")]
    # per-trial seconds of the trials that ran (one pruned unrun by its prediction takes milliseconds)
    seconds = [t.runtime_s for t in finished if t.runtime_s is not None and t not in unrun]
    overruns = [t.runtime_s - t.time_limit_s for t in finished if t.runtime_s is not None and t.time_limit_s]
    coarse, final = [], []
    for t in trials:
        if t.complete and t.levels:
            first = next(
                (lv["tre_mean"] for lv in t.levels if lv.get("tre_mean") is not None and lv["level"] == 0), None
            )
            if first is not None and np.isfinite(first) and np.isfinite(t.value):
                coarse.append(first)
                final.append(t.value)
    pruned_seconds = sum(t.runtime_s or 0 for t in trials if t.state == "PRUNED")
    # how well the cost model foresaw the trials that ran to the end (its prediction decides which run at all)
    ratios = [t.runtime_s / t.predicted_s for t in trials if t.complete and t.runtime_s and t.predicted_s]
    return {
        "wall_s": round(wall_s, 1),
        "trials": len(finished),
        "complete": sum(t.state == "COMPLETE" for t in trials),
        "pruned": sum(t.state == "PRUNED" for t in trials),
        "pruned_unrun": len(unrun),
        "failed": sum(t.state == "FAIL" for t in trials),
        "best": best.value if best else None,
        "best_trial": best.number if best else None,
        "honest": best.tre_report_mean if best else None,
        "best_seconds": best.runtime_s if best else None,
        "best_folding": best.folding_fraction if best else None,
        "best_kinds": list(best.recipe and [s["transform"]["kind"] for s in best.recipe["stages"]] or [])
        if best
        else None,
        "baseline": base.value if base else None,
        "baseline_state": base.state if base else None,
        "seconds_median": float(np.median(seconds)) if seconds else None,
        "seconds_p90": float(np.percentile(seconds, 90)) if seconds else None,
        "seconds_max": float(max(seconds)) if seconds else None,
        "registration_s": float(sum(seconds)),
        "pruned_s": float(pruned_seconds),
        "largest_overrun_s": float(max(overruns)) if overruns else None,
        "coarse_final_spearman": spearman(coarse, final),
        "measured_over_predicted": [float(np.percentile(ratios, q)) for q in (10, 50, 90)] if ratios else None,
    }


def tune_case(case: str, *, trials: int, jobs: int, timeout: float, prune: bool, stages: str | None) -> dict:
    import yaml

    folder = DATA3D / case
    doc = yaml.safe_load((folder / "pair.yaml").read_text())
    variant = ("prune" if prune else "noprune") + (
        f"-{stages.replace('+', '-')}" if stages else ""
    )  # a study name has no "+"
    doc["name"] = f"{case}-{variant}"
    if stages:
        doc["stages"] = stages.split("+")
    if not prune:
        doc["prune"] = False
    for key in ("fixed", "moving"):
        doc[key] = str(folder / doc[key])
    doc["landmarks"] = {k: str(folder / v) for k, v in doc["landmarks"].items()}
    work = RESULTS / "tune3d" / doc["name"]
    shutil.rmtree(work, ignore_errors=True)  # a fresh study: tune would resume an earlier one
    work.mkdir(parents=True)
    pair = work / "pair.yaml"
    pair.write_text(yaml.safe_dump(doc), encoding="utf-8")
    cmd = [
        *CLI,
        "tune",
        str(pair),
        "--trials",
        str(trials),
        "--jobs",
        str(jobs),
        "--timeout",
        str(timeout),
        "--study-dir",
        str(work / "study"),
        "-q",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = summarise(studyinfo.load(work / "study", doc["name"]), wall)
    out.update(
        case=case,
        variant=variant,
        stages=doc["stages"],
        command=" ".join(cmd[1:]),
        exit=proc.returncode,
        summary=proc.stdout.strip().splitlines()[-6:],
        load=round(_load(), 2),
    )
    return out


def export_best(folder: Path, within: float | None = None) -> Path | None:
    """``autoreg export`` of the study's best recipe (or, with ``within``, the fastest within that percent of it);
    the recipe's path, None where export failed."""
    best = _recipe_path(folder, within)
    choice = ["--within", str(within)] if within is not None else []
    proc = subprocess.run(
        [*CLI, "export", str(folder / "pair.yaml"), "--study-dir", str(folder / "study"), "-o", str(best)]
        + ["--repeats", "0", *choice],
        capture_output=True,
        text=True,
    )
    return best if proc.returncode == 0 else None


def every_landmark(folder: Path, within: float | None = None) -> float | None:
    """The exported recipe (``export_best``) scored on every landmark, as the peers are, by ``autoreg evaluate`` (one
    run; the study's own figures use the landmarks it selected with, or those it never saw)."""
    best = export_best(folder, within)
    if best is None:
        return None
    out = best.with_suffix(".every_landmark.json") if within is not None else folder / "every_landmark.json"
    proc = subprocess.run(
        [*CLI, "evaluate", str(best), str(folder / "pair.yaml"), "--repeats", "1", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    return json.loads(out.read_text())["overall"]["mean"] if proc.returncode == 0 else None


def _recipe_path(folder: Path, within: float | None) -> Path:
    return folder / ("best.yaml" if within is None else f"within-{within:g}.yaml")


def seconds_2_threads(folder: Path, within: float | None = None) -> float | None:
    """Seconds of one registration with the exported recipe on 2 ITK threads (the peers' setting)."""
    from autoreg.pipeline import Pipeline
    from autoreg.recipe import load_recipe
    from autoreg.registration import register

    best = _recipe_path(folder, within)
    if not best.is_file():
        return None
    pair = Pipeline.load(folder / "pair.yaml").all_landmark_pairs[0]
    t0 = time.perf_counter()
    register(load_recipe(best).with_(threads=2), pair)
    return time.perf_counter() - t0


def _load() -> float:
    import os

    return os.getloadavg()[0]


def peers() -> dict:
    path = RESULTS / "peers3d.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _f(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    p = peers()
    lines = [
        "| case | stages | wall | best TRE (honest) mm | best on every landmark | elastix | ANTs | default | "
        "best s (2 threads) | ANTs s | trials (pruned: unrun, failed) | "
        "s/trial median, p90, max | largest overrun s | coarse-final rho | measured/predicted s p10, p50, p90 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peer = p.get(r["case"], {})
        el, an = peer.get("elastix", {}).get("mean"), peer.get("ants", {}).get("mean")
        lines.append(
            f"| {r['case']} ({r['variant']}) | {'+'.join(r['stages'])} | {r['wall_s'] / 60:.1f} min | "
            f"{_f(r['best'])} ({_f(r['honest'])}) | {_f(r.get('every_landmark'))} | {_f(el)} | {_f(an)} | "
            f"{_f(r['baseline'])} | {_f(r.get('seconds_2_threads'))} | {_f(peer.get('ants', {}).get('seconds'))} | "
            f"{r['trials']} ({r['pruned']}: {r.get('pruned_unrun', '-')} unrun, {r['failed']}) | "
            f"{_f(r['seconds_median'])}, {_f(r['seconds_p90'])}, {_f(r['seconds_max'])} | "
            f"{_f(r['largest_overrun_s'])} | {_f(r['coarse_final_spearman'], '.2f')} | "
            f"{', '.join(_f(v, '.2f') for v in r.get('measured_over_predicted') or []) or '-'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--no-prune", action="store_true", help="the same study without multi-fidelity pruning")
    parser.add_argument("--stages", help="override the cases' stages, e.g. affine+deformable")
    parser.add_argument("--report", action="store_true", help="only print the table of the saved results")
    parser.add_argument(
        "--within",
        type=float,
        help="with --every-landmark: also the fastest recipe within this percent of the best (export --within)",
    )
    parser.add_argument(
        "--every-landmark",
        action="store_true",
        help="score each saved case's best recipe on every landmark (no tuning)",
    )
    args = parser.parse_args()
    if not DATA3D.is_dir():
        print(f"SKIP: {DATA3D} missing: run benchmarks/make_3d_set.py first")
        return 0
    import yaml

    path = RESULTS / "tune3d.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if args.every_landmark:
        for r in saved.values():
            folder = RESULTS / "tune3d" / f"{r['case']}-{r['variant']}"
            wanted = args.only.split(",")
            if (r["case"] in wanted or f"{r['case']}/{r['variant']}" in wanted) and (folder / "study").is_dir():
                r["every_landmark"] = every_landmark(folder)
                r["seconds_2_threads"] = seconds_2_threads(folder)
                print(r["case"], r["variant"], r["every_landmark"], r["seconds_2_threads"], flush=True)
                if args.within is not None:
                    recipe = yaml.safe_load(_recipe_path(folder, None).read_text()) or {}
                    fast = every_landmark(folder, args.within)
                    chosen = (yaml.safe_load(_recipe_path(folder, args.within).read_text()) or {}) if fast else {}
                    r["within"] = {
                        "percent": args.within,
                        "trial": chosen.get("provenance", {}).get("trial"),
                        "best_trial": recipe.get("provenance", {}).get("trial"),
                        "score": chosen.get("provenance", {}).get("score"),
                        "every_landmark": fast,
                        "seconds_2_threads": seconds_2_threads(folder, args.within) if fast else None,
                    }
                    print(r["case"], r["variant"], "within", r["within"], flush=True)
        path.write_text(json.dumps(saved, indent=2), encoding="utf-8")
    elif args.report:  # re-read each saved case's study: figures added to summarise() since it ran appear too
        for r in saved.values():
            folder = RESULTS / "tune3d" / f"{r['case']}-{r['variant']}" / "study"
            name = yaml.safe_load((folder.parent / "pair.yaml").read_text())["name"] if folder.is_dir() else None
            if name and (folder / "journal.log").exists():
                r.update(summarise(studyinfo.load(folder, name), r["wall_s"]))
    else:
        for case in args.only.split(","):
            r = tune_case(
                case,
                trials=args.trials,
                jobs=args.jobs,
                timeout=args.timeout,
                prune=not args.no_prune,
                stages=args.stages,
            )
            saved[f"{case}/{r['variant']}"] = r
            path.write_text(json.dumps(saved, indent=2), encoding="utf-8")
            print(table([r]), flush=True)
    print(table(list(saved.values())))
    within = [r for r in saved.values() if r.get("within")]
    if within:
        print(
            "\n| case | best trial: every landmark, s (2 threads) | fastest within | its trial, score | "
            "every landmark | s (2 threads) | ANTs SyN, s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        p = peers()
        for r in within:
            w, an = r["within"], p.get(r["case"], {}).get("ants", {})
            print(
                f"| {r['case']} ({r['variant']}) | {w['best_trial']}: {_f(r.get('every_landmark'))}, "
                f"{_f(r.get('seconds_2_threads'))} | {w['percent']:g} % | {w['trial']}, {_f(w['score'])} | "
                f"{_f(w['every_landmark'])} | {_f(w['seconds_2_threads'])} | {_f(an.get('mean'))}, "
                f"{_f(an.get('seconds'))} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
