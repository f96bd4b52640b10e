"""Every benchmark behind BENCHMARKS.md, in order, with one command:

    pip install -e ".[bench]"
    python benchmarks/run_all.py [--trials 60] [--jobs 2] [--skip tune_all,generalise,...]

Skips (exit 0, with a message) when ../shared/data is absent. On a 2-core machine the whole run takes many hours,
most of it the 60-trial studies of tune_all (the 3D brain alone needs hours; ``--timeout-3d`` bounds it). Each step is
also a script of its own; their outputs go to benchmarks/results/ and the console log to
benchmarks/results/run_all.log.

Steps: tune_all (issue 3: 60 trials per pair and stage list), generalise (tuned on the other pairs of a kind),
parallel (trials/min at --jobs 1 and 2), pruning (registration time saved at equal best), overhead (against bare
SimpleITK), peers --check (point conventions) and peers (default / elastix / ANTs / autoreg / generalisation).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, require_shared_data  # noqa: E402

HERE = Path(__file__).resolve().parent


def steps(trials: int, jobs: int, timeout_3d: int) -> list[tuple[str, list[str]]]:
    py = sys.executable
    return [
        (
            "tune_all",
            [
                py,
                str(HERE / "tune_all.py"),
                "--trials",
                str(trials),
                "--jobs",
                str(jobs),
                "--timeout-3d",
                str(timeout_3d),
            ],
        ),
        ("generalise", [py, str(HERE / "generalise.py"), "--trials", str(trials), "--jobs", str(jobs)]),
        ("parallel", [py, str(HERE / "parallel.py")]),
        ("pruning", [py, str(HERE / "pruning.py")]),
        ("overhead", [py, str(HERE / "overhead.py")]),
        ("peers_check", [py, str(HERE / "peers.py"), "--check"]),
        ("peers", [py, str(HERE / "peers.py")]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout-3d", type=int, default=3 * 3600, help="seconds for the 3D study (tune --timeout)")
    ap.add_argument("--skip", default="", help="comma-separated step names to leave out")
    args = ap.parse_args()
    require_shared_data()
    skip = set(filter(None, args.skip.split(",")))
    log_path = REPO / "benchmarks" / "results" / "run_all.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    with log_path.open("a", encoding="utf-8") as log:
        for name, cmd in steps(args.trials, args.jobs, args.timeout_3d):
            if name in skip:
                continue
            print(f"## {name}: {' '.join(cmd[1:])}", flush=True)
            log.write(f"## {name}\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                print(line, end="", flush=True)
                log.write(line)
            if proc.wait() != 0:
                failed.append(name)
    if failed:
        print(f"failed steps: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
