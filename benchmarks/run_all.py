"""Every benchmark behind BENCHMARKS.md, in order, with one command:

    pip install -e ".[bench]"
    python benchmarks/run_all.py [--group round1,3d,deformable,data] [--trials 60] [--jobs 2] [--skip NAME,...]
    python benchmarks/run_all.py --list            # the steps of each group, without running them

Skips (exit 0, with a message) when ../shared/data is absent. On a 2-core machine the whole run takes many hours.
Each step is also a script of its own; their outputs go to benchmarks/results/ and the console log to
benchmarks/results/run_all.log. A step that fails is reported at the end and does not stop the others.

Groups (default: all of them, in this order):

- ``round1``: tune_all (60 trials per pair and stage list), generalise, parallel, pruning, overhead, peers --check
  and peers;
- ``3d``: the 3D set built, its peers, tune3d on every case, each best scored on every landmark;
- ``deformable`` (issue 13's figures): the histology pairs' ``[affine, deformable]`` studies against elastix and
  SyN, the 3D deformable cases (mmdef3d, afids) with ``[affine, deformable]`` and ``[affine, displacement]``
  scored on every landmark (``--within 15`` too), the field's settings and the BSpline cost law, Demons, and what
  the landmarks themselves allow (landmark_floor);
- ``data``: recipes on unseen pairs (crossval_loo), Dask against local workers, spacing invariance, the
  initializers and the same-modality test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, require_shared_data  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFORMABLE_3D = "mmdef3d,afids"


def _script(name: str, *args: object) -> list[str]:
    return [sys.executable, str(HERE / f"{name}.py"), *map(str, args)]


def groups(trials: int, jobs: int, timeout_3d: int) -> dict[str, list[tuple[str, list[str]]]]:
    """Each group's (step name, command) in the order they run; a step name is unique across groups."""
    every = f"{DEFORMABLE_3D.replace(',', '/prune-affine-deformable,')}/prune-affine-deformable," + ",".join(
        f"{c}/prune-affine-displacement" for c in DEFORMABLE_3D.split(",")
    )
    return {
        "round1": [
            ("tune_all", _script("tune_all", "--trials", trials, "--jobs", jobs, "--timeout-3d", timeout_3d)),
            ("generalise", _script("generalise", "--trials", trials, "--jobs", jobs)),
            ("parallel", _script("parallel")),
            ("pruning", _script("pruning")),
            ("overhead", _script("overhead")),
            ("peers_check", _script("peers", "--check")),
            ("peers", _script("peers")),
        ],
        "3d": [
            ("make_3d_set", _script("make_3d_set")),
            ("peers3d", _script("peers3d")),
            ("tune3d", _script("tune3d", "--trials", trials, "--jobs", jobs)),
            ("tune3d_every_landmark", _script("tune3d", "--every-landmark")),
        ],
        "deformable": [
            ("deformable", _script("deformable", "--trials", trials, "--jobs", jobs, "--timeout", 240)),
            ("make_3d_set_deformable", _script("make_3d_set", "--only", DEFORMABLE_3D)),
            ("peers3d_deformable", _script("peers3d", "--only", DEFORMABLE_3D)),
            (
                "tune3d_deformable",
                _script("tune3d", "--only", DEFORMABLE_3D, "--stages", "affine+deformable", "--timeout", 600),
            ),
            (
                "tune3d_displacement",
                _script("tune3d", "--only", DEFORMABLE_3D, "--stages", "affine+displacement", "--timeout", 600),
            ),
            (
                "tune3d_deformable_every_landmark",
                _script("tune3d", "--every-landmark", "--only", every, "--within", 15),
            ),
            ("deformable3d", _script("deformable3d")),
            ("demons", _script("demons")),
            ("demons_histology", _script("demons", "--histology")),
            ("landmark_floor", _script("landmark_floor")),
            ("threads", _script("threads")),
        ],
        "data": [
            ("crossval_loo", _script("crossval_loo")),
            ("dask_vs_jobs", _script("dask_vs_jobs")),
            ("spacing", _script("spacing")),
            ("initializers", _script("initializers")),
            ("modality", _script("modality")),
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", default="", help="comma-separated groups to run (default: every group)")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout-3d", type=int, default=3 * 3600, help="seconds for tune_all's 3D study (tune --timeout)")
    ap.add_argument("--skip", default="", help="comma-separated step names to leave out")
    ap.add_argument("--list", action="store_true", help="print the steps of the chosen groups and stop")
    args = ap.parse_args()
    every = groups(args.trials, args.jobs, args.timeout_3d)
    wanted = [g for g in args.group.split(",") if g] or list(every)
    unknown = [g for g in wanted if g not in every]
    if unknown:
        ap.error(f"--group: unknown {', '.join(unknown)} (expected some of {', '.join(every)})")
    skip = set(filter(None, args.skip.split(",")))
    chosen = [(name, cmd) for g in wanted for name, cmd in every[g] if name not in skip]
    if args.list:
        for name, cmd in chosen:
            print(f"{name}: python {' '.join(Path(c).name if c.endswith('.py') else c for c in cmd[1:])}")
        return
    require_shared_data()
    log_path = REPO / "benchmarks" / "results" / "run_all.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    with log_path.open("a", encoding="utf-8") as log:
        for name, cmd in chosen:
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
