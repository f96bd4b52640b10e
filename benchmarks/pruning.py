"""What pruning saves (issue 3 item 5, issue 6 item 3): the same study with pruning on and off.

    python benchmarks/pruning.py [--pair cima_lunglesion3_he_ki67] [--stages affine] [--trials 40]

Both studies use --jobs 1 and the same seed, so they start from the same trials; they part ways at the first
pruned trial (the sampler sees it). Reports the registration seconds spent, the wall time and the best TRE.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pair", default="cima_lunglesion3_he_ki67")
    ap.add_argument("--stages", default="affine")
    ap.add_argument("--trials", type=int, default=40)
    args = ap.parse_args()
    require_shared_data()
    out = REPO / "benchmarks" / "results" / "pruning"
    rows = {}
    for prune in (True, False):
        label = "on" if prune else "off"
        pair = write_pair_yaml(out / label, args.pair, args.stages.split("+"), prune=prune)
        study_dir = out / f"study-{label}"
        shutil.rmtree(study_dir, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "autoreg.cli", "tune", str(pair), "--trials", str(args.trials),
                        "--jobs", "1", "--seed", "0", "--study-dir", str(study_dir), "-q"], check=True,
                       capture_output=True, text=True)
        fig = studyinfo.figures(studyinfo.load(study_dir, pair.stem))
        fig["wall_s"] = time.perf_counter() - t0
        rows[label] = fig
    print(f"# pruning: {args.pair} [{args.stages}], {args.trials} trials, --jobs 1 ({stamp()}, {machine()})")
    for label, f in rows.items():
        print(f"pruning {label:3s}: best {f['best']:.4g} (trial {f['best_trial']}), pruned {f['pruned']}, failed "
              f"{f['failed']}, registration time {f['registration_s']:.1f} s, wall {f['wall_s']:.1f} s")
    on, off = rows["on"], rows["off"]
    print(f"registration time with/without pruning = {on['registration_s'] / off['registration_s']:.3f}; "
          f"wall = {on['wall_s'] / off['wall_s']:.3f}; best TRE with/without = {on['best'] / off['best']:.3f}")


if __name__ == "__main__":
    main()
