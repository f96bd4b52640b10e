"""Trials per minute and overhead per trial: ``tune --dask-scheduler`` on 2 local Dask workers (1 thread each)
against ``tune --jobs 2`` (issue 16, figures).

    python benchmarks/dask_vs_jobs.py [--trials 24] [--pair cima_lunglesion3_he_ki67] [--repeats 1]

For each pair (the quickstart example and one histology pair, stages [affine]) N recipes are drawn from the study's
search space (random sampler, no registration) and enqueued after the default recipe, pruning off: both ways run
exactly the same registrations. The Dask cluster (``dask scheduler`` + ``dask worker --nworkers 2 --nthreads 1``,
127.0.0.1) is started once and shared by every run; ``--jobs 2`` gets one ITK thread per worker on 2 cores, as the
Dask workers do. Figures:

* trials/min: trials over the command's wall time (start-up, data loading and calibration included), and over the
  span from the first trial's start to the last one's end (the steady rate);
* overhead per trial: worker-seconds not spent inside trials, (2 x wall - sum of trial runtimes) / trials;
* in-trial: the mean of the trials' own runtime (the same recipes: shows a slowdown inside the Dask workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import studyinfo  # noqa: E402
from common import REPO, machine, pair_files, require_shared_data, stamp  # noqa: E402

QUICKSTART = REPO / "examples" / "quickstart" / "pair.yaml"


def start_cluster(root: Path) -> tuple[str, list[subprocess.Popen]]:
    root.mkdir(parents=True, exist_ok=True)
    sched_file = root / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(sched_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(root / "scheduler.log", "wb"),
            start_new_session=True,
        )
    ]
    while not sched_file.is_file():
        time.sleep(0.1)
    time.sleep(0.3)
    address = json.loads(sched_file.read_text())["address"]
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--local-directory",
                str(root / "workers"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(root / "workers.log", "wb"),
            start_new_session=True,
        )
    )
    from distributed import Client

    with Client(address, set_as_default=False, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
    return address, procs


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def pair_doc(label: str, name: str | None) -> dict:
    """The PAIR.yaml keys (absolute paths) of the quickstart example or of a shared pair."""
    if name is None:
        doc = yaml.safe_load(QUICKSTART.read_text())
        for key in ("fixed", "moving"):
            doc[key] = str(QUICKSTART.parent / doc[key])
        doc["landmarks"] = {k: str(QUICKSTART.parent / v) for k, v in doc["landmarks"].items()}
    else:
        files = pair_files(name)
        doc = {
            "fixed": str(files["fixed"]),
            "moving": str(files["moving"]),
            "landmarks": {"fixed": str(files["fixed_landmarks"]), "moving": str(files["moving_landmarks"])},
        }
    doc.update({"name": label, "stages": ["affine"], "prune": False})
    return doc


def draw_recipes(doc: dict, folder: Path, n: int, seed: int = 0) -> list[str]:
    """N recipes of the study's search space, drawn by a random sampler (nothing is registered)."""
    import optuna

    from autoreg.config import parse_pair_file
    from autoreg.objective import trial_seed
    from autoreg.pipeline import Pipeline
    from autoreg.recipe import save_recipe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = Pipeline(parse_pair_file(doc, folder / "draw.yaml")).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    paths = []
    for i in range(n):
        recipe = space.suggest(study.ask(), seed=trial_seed(seed, i + 1))
        path = folder / "recipes" / f"r{i:03d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, path)
        paths.append(str(path))
    return paths


def run(pair: Path, study_dir: Path, trials: int, *how: str) -> float:
    if study_dir.exists():
        shutil.rmtree(study_dir)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoreg.cli",
            "tune",
            str(pair),
            "--trials",
            str(trials),
            "--seed",
            "0",
            "--study-dir",
            str(study_dir),
            "-q",
            *how,
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"tune failed ({' '.join(how)}):\n{proc.stderr[-2000:]}")
    return wall


def measure(study_dir: Path, name: str, wall: float) -> dict:
    study = studyinfo.load(study_dir, name)
    trials = study.get_trials(deepcopy=False)
    runtime = sum(t.user_attrs.get("runtime_s") or 0.0 for t in trials)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds()
    n = len(trials)
    return {
        "trials": n,
        "wall": wall,
        "span": span,
        "per_min": n / wall * 60,
        "per_min_span": n / span * 60,
        "overhead": (2 * wall - runtime) / n,
        "in_trial": runtime / n,
        "complete": sum(t.state.name == "COMPLETE" for t in trials),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="cima_lunglesion3_he_ki67", help="the histology pair of ../shared/data")
    ap.add_argument("--trials", type=int, default=24, help="recipes per study (after the default recipe)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each way, alternating")
    args = ap.parse_args()
    require_shared_data()
    out = REPO / "benchmarks" / "results" / "dask_vs_jobs"
    shutil.rmtree(out, ignore_errors=True)
    address, procs = start_cluster(out / "cluster")
    rows = []
    try:
        for label, shared in (("quickstart", None), (args.pair, args.pair)):
            folder = out / label
            folder.mkdir(parents=True, exist_ok=True)
            doc = pair_doc(f"dvj-{label}", shared)
            doc["enqueue"] = draw_recipes(doc, folder, args.trials)
            pair = folder / "pair.yaml"
            pair.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
            total = args.trials + 1  # the default recipe, then the drawn ones
            for r in range(args.repeats):
                for way, how in (("jobs 2", ("--jobs", "2")), ("dask 2x1", ("--dask-scheduler", address))):
                    sdir = folder / f"study-{way.replace(' ', '')}-{r}"
                    wall = run(pair, sdir, total, *how)
                    rows.append((label, way, measure(sdir, doc["name"], wall)))
    finally:
        stop_cluster(procs)
    print(
        f"# dask_vs_jobs: {args.trials} drawn recipes + the default per study, stages [affine], pruning off, "
        f"{args.repeats} run(s) each ({stamp()}, {machine()})"
    )
    print(
        f"{'pair':34s} {'way':9s} {'trials':>6s} {'wall s':>7s} {'tr/min':>7s} {'tr/min*':>7s} "
        f"{'ovh s/tr':>8s} {'in-trial s':>10s}"
    )
    for label, way, m in rows:
        print(
            f"{label:34s} {way:9s} {m['trials']:6d} {m['wall']:7.1f} {m['per_min']:7.1f} {m['per_min_span']:7.1f} "
            f"{m['overhead']:8.3f} {m['in_trial']:10.3f}"
        )
    print(
        "(tr/min: over the wall time; tr/min*: over the span of the trials; ovh: (2 x wall - sum of trial "
        "runtimes) / trials)"
    )
    for label in dict.fromkeys(r[0] for r in rows):
        by = {way: [m for lb, w, m in rows if lb == label and w == way] for way in ("jobs 2", "dask 2x1")}
        mean = {
            w: {k: sum(m[k] for m in ms) / len(ms) for k in ("per_min", "per_min_span", "overhead")}
            for w, ms in by.items()
        }
        print(
            f"{label}: dask/jobs trials per minute = {mean['dask 2x1']['per_min'] / mean['jobs 2']['per_min']:.2f} "
            f"(steady: {mean['dask 2x1']['per_min_span'] / mean['jobs 2']['per_min_span']:.2f}); overhead per "
            f"trial {mean['jobs 2']['overhead']:.3f} s (jobs) vs {mean['dask 2x1']['overhead']:.3f} s (dask)"
        )


if __name__ == "__main__":
    main()
