"""The baseline every study must beat: the SimpleITK-notebooks default recipe, run with `autoreg apply` on every
pair of ../shared/data. Prints mean TRE before and after, and seconds per registration.

    python benchmarks/baseline.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAIR_STAGES, machine, pair_files, require_shared_data, stamp  # noqa: E402

from autoreg.recipe import default_recipe, save_recipe  # noqa: E402

TRE_LINE = re.compile(r"TRE mean ([\d.eE+-]+) -> ([\d.eE+-]+)")
SECONDS = re.compile(r"registered in ([\d.]+) s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="runs per pair (sampling seeds 0..K-1)")
    ap.add_argument("--only", default="", help="only pairs whose name contains this")
    args = ap.parse_args()
    require_shared_data()
    print(f"# baseline: SimpleITK-notebooks default recipe via `autoreg apply` ({stamp()}, {machine()})")
    print(f"{'pair':36s} {'stages':16s} {'TRE before':>10s} {'TRE after (mean of runs)':>26s} {'s/reg':>7s}  failures")
    with tempfile.TemporaryDirectory() as tmp:
        for name, stage_lists in PAIR_STAGES.items():
            if args.only not in name:
                continue
            files = pair_files(name)
            dim = 3 if files["fixed"].name.endswith(".nii.gz") else 2
            for stages in stage_lists:
                afters, secs, fails, before = [], [], [], None
                for seed in range(args.repeats):
                    recipe_path = Path(tmp) / f"default-{'-'.join(stages)}-{seed}.yaml"
                    save_recipe(default_recipe(stages, dim, seed=seed), recipe_path)
                    t0 = time.perf_counter()
                    proc = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "autoreg.cli",
                            "apply",
                            str(recipe_path),
                            "--fixed",
                            str(files["fixed"]),
                            "--moving",
                            str(files["moving"]),
                            "--transform-out",
                            str(Path(tmp) / "t.tfm"),
                            "--fixed-landmarks",
                            str(files["fixed_landmarks"]),
                            "--moving-landmarks",
                            str(files["moving_landmarks"]),
                        ],
                        capture_output=True,
                        text=True,
                    )
                    wall = time.perf_counter() - t0
                    m = TRE_LINE.search(proc.stdout)
                    if proc.returncode != 0 or not m:
                        fails.append(
                            proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                        )
                        continue
                    before = float(m.group(1))
                    afters.append(float(m.group(2)))
                    s = SECONDS.search(proc.stdout)
                    secs.append(float(s.group(1)) if s else wall)
                after = (
                    f"{sum(afters) / len(afters):.2f} [{min(afters):.2f}..{max(afters):.2f}]"
                    if afters
                    else "all failed"
                )
                sec = f"{sum(secs) / len(secs):.2f}" if secs else "-"
                b = f"{before:.2f}" if before is not None else "-"
                print(
                    f"{name:36s} {'+'.join(stages):16s} {b:>10s} {after:>26s} {sec:>7s}  {len(fails)}/{args.repeats} {'; '.join(sorted(set(fails)))}"
                )


if __name__ == "__main__":
    main()
