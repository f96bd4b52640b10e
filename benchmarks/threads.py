"""How far two runs of one recipe land apart, by metric and thread count: why a study runs each trial on one thread.

    pip install -e ".[bench]"
    python benchmarks/threads.py [--only ratkidney] [--runs 3]

Per histology pair, the SimpleITK-notebooks default affine stage (``recipe.default_recipe``: Mattes 50 bins, 1 %
random sampling, gradient descent) and the same stage with regular sampling, with every pixel, and with the
correlation metric, each registered ``--runs`` times with the same seed on 1 and on 2 threads. Reported: the largest
distance between the runs' mappings of a 20x20 grid over the fixed image (px; 0 means bit-identical runs) and the
mean TRE over every landmark of each run. ITK's Mattes metric adds each thread's share of its joint-histogram
derivative into one buffer under a lock, in the order the threads get it (``MattesMutualInformation...Threader``),
so with two threads the sums, and from there the whole optimisation, differ from run to run.

Results go to ``benchmarks/results/threads.json``, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HISTOLOGY, RESULTS, machine, require_shared_data, stamp  # noqa: E402

OUT = RESULTS / "threads.json"


def variants():
    """The default affine stage and the same with one thing changed: the sampling, or the metric."""
    from autoreg.recipe import Correlation, Sampling, default_recipe

    recipe = default_recipe(["affine"], dim=2, seed=12345)
    stage = recipe.stages[0]
    return recipe, {
        "Mattes, random 1 % (default)": stage,
        "Mattes, regular 1 %": stage.model_copy(update={"sampling": Sampling(strategy="regular", percentage=0.01)}),
        "Mattes, every pixel": stage.model_copy(update={"sampling": Sampling(strategy="none")}),
        "correlation, random 1 %": stage.model_copy(update={"metric": Correlation()}),
    }


def spread(name: str, runs: int) -> list[dict]:
    from peers import load

    import autoreg
    from autoreg.scoring import transform_points, tre

    pair = load(name, ["affine"])  # every landmark (the pair is not split here)
    size = pair.fixed.GetSize()
    grid = np.array(
        [
            pair.fixed.TransformContinuousIndexToPhysicalPoint((float(x), float(y)))
            for x in np.linspace(0, size[0] - 1, 20)
            for y in np.linspace(0, size[1] - 1, 20)
        ]
    )
    recipe, stages = variants()
    rows = []
    for label, stage in stages.items():
        for threads in (1, 2):
            one = recipe.model_copy(update={"stages": (stage,), "threads": threads})
            mapped, tres = [], []
            for _ in range(runs):
                tx = autoreg.register(one, pair.fixed, pair.moving)
                mapped.append(transform_points(tx, grid))
                tres.append(tre(tx, pair.fixed_points, pair.moving_points, pair.fixed).mean)
            apart = max(float(np.linalg.norm(m - mapped[0], axis=1).max()) for m in mapped)
            rows.append({"pair": name, "stage": label, "threads": threads, "apart_px": apart, "tre": tres})
            print(f"  {name} {label}, {threads} thread(s): apart {apart:.3g} px, TRE {tres}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| pair | affine stage | threads | runs apart (px) | TRE of each run (px) |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        tres = ", ".join(f"{t:.2f}" for t in r["tre"])
        lines.append(f"| {r['pair']} | {r['stage']} | {r['threads']} | {r['apart_px']:.3g} | {tres} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="pairs whose name contains this")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    require_shared_data()
    names = [n for n in HISTOLOGY if args.only in n]
    rows = [row for name in names for row in spread(name, args.runs)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"stamp": stamp(), "machine": machine(), "rows": rows}, indent=2), encoding="utf-8")
    print(f"# threads: {args.runs} runs per stage and thread count ({stamp()}, {machine()})")
    print(table(rows))


if __name__ == "__main__":
    main()
