"""Issue 6: autoreg against the tools people use instead, every result scored by autoreg's own TRE code.

    pip install -e ".[bench]"
    python benchmarks/peers.py [--only SUBSTRING] [--tools default,elastix,ants,autoreg,generalise] [--threads 2]
    python benchmarks/peers.py --check      # point conventions of each peer on the pair with a known shift

Per pair of ../shared/data and its fitting stages (common.PAIR_STAGES), one registration per tool:

* ``default``: the SimpleITK-notebooks default recipe (autoreg's trial 0), seed 0;
* ``elastix``: itk-elastix with its default parameter maps for the same stages (rigid / affine / affine + bspline);
* ``ants``: ANTsPy with the matching transform type (Rigid, Affine, or SyN for a deformable last stage);
* ``autoreg``: the best trial of the 60-trial study that ``tune_all.py`` left in benchmarks/results/studies, as the
  study recorded it (TRE statistics and registration seconds; ``autoreg apply`` of its recipe reproduces them);
* ``generalise``: a recipe tuned without this pair: the best of the multi-pair study over the other pairs of the
  same kind that ``generalise.py`` left (histology), or the other pair's own study (the two translation pairs);
  none for the single 3D pair.

Mean, median and 90th-percentile TRE come from ``autoreg.scoring.tre_stats`` on the same landmarks for every tool;
each tool runs in its own process (a peer that crashes, as itk-elastix can, is recorded, not fatal), with the same
number of threads (autoreg's tuned recipes keep the 1 thread they were tuned with, so their time is 1-thread time).
Results go to benchmarks/results/peers.json; ``--report`` prints the table again. Skips when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    HISTOLOGY,
    PAIR_STAGES,
    RESULTS,
    machine,
    pair_files,
    require_shared_data,
    selected,
    stamp,
    write_pair_yaml,
)

TOOLS = ("default", "elastix", "ants", "autoreg", "generalise")
TRANSLATION = [n for n in PAIR_STAGES if n.startswith("itk_")]
CHECK_PAIR = "itk_brain_pd_shift13x17"


def load(name: str, stages: list[str]):
    from autoreg.config import load_config
    from autoreg.data import load_pair

    cfg = load_config(write_pair_yaml(RESULTS / "pairs", name, stages))
    return load_pair(cfg.pairs[0])


def stats_of(mapped: np.ndarray, pair) -> dict:
    from autoreg.scoring import tre_stats

    s = tre_stats(mapped - pair.moving_points, pair.fixed)
    return {"mean": s.mean, "median": s.median, "p90": s.p90, "max": s.max}


def study_best(study_dir: Path, study_name: str):
    """The best trial of a finished study (None if there is no such study or nothing completed)."""
    import studyinfo

    from autoreg.trial import best_and_baseline, records

    if not (study_dir / "journal.log").exists():
        return None
    return best_and_baseline(records(studyinfo.load(study_dir, study_name)))[0]


def tuned_source(tool: str, name: str, stages: list[str]) -> tuple[Path, str] | None:
    """Where the recipe of row ``autoreg`` or ``generalise`` comes from: (study folder, study name)."""
    tag = "-".join(stages)
    if tool == "autoreg":
        return RESULTS / "studies" / f"{name}-{tag}", f"{name}-{tag}"
    if name in TRANSLATION:
        other = next(n for n in TRANSLATION if n != name)
        return RESULTS / "studies" / f"{other}-{tag}", f"{other}-{tag}"
    if name in HISTOLOGY:
        return RESULTS / "generalise" / "studies" / f"gen-{name}-{tag}", f"gen-{name}-{tag}"
    return None


def run_one(tool: str, name: str, stages: list[str], threads: int, direction: str = "fwd") -> dict:
    """One tool on one pair, in this process; returns the JSON row."""
    import peer_tools

    pair = load(name, stages)
    files = pair_files(name)
    row: dict = {"tool": tool, "threads": threads}
    if tool in ("elastix", "ants"):
        fn = peer_tools.run_elastix if tool == "elastix" else peer_tools.run_ants
        kw = {"direction": direction} if tool == "ants" else {}
        if tool == "elastix" and direction == "inv":
            fn = peer_tools.elastix_inverse_convention
        mapped, seconds = fn(files["fixed"], files["moving"], pair.fixed_points, stages, threads=threads, **kw)
        row.update(
            stats_of(mapped, pair),
            seconds=seconds,
            setting=("+".join(peer_tools.elastix_maps(stages)) if tool == "elastix" else peer_tools.ants_type(stages)),
        )
        return row
    from autoreg.recipe import default_recipe
    from autoreg.registration import register
    from autoreg.scoring import transform_points

    if tool == "default":
        recipe = default_recipe(stages, pair.dim, seed=0).model_copy(update={"threads": threads})
        row["setting"] = "SimpleITK-notebooks default"
    else:
        from autoreg.recipe import recipe_from_dict

        source = tuned_source(tool, name, stages)
        best = study_best(*source) if source else None
        if best is None:
            row["missing"] = "no study" if source else "no other pair of this kind"
            return row
        recipe = recipe_from_dict(best.recipe)
        row.update(setting=f"{source[1]} trial {best.number}", study_value=best.value, threads=recipe.effective_threads)
        if tool == "autoreg":  # the study's own record of its best trial (``autoreg apply`` reproduces it exactly)
            row.update(
                mean=best.tre_mean, median=best.tre_median, p90=best.tre_p90, max=best.tre_max, seconds=best.runtime_s
            )
            return row
    t0 = time.perf_counter()
    result = register(recipe, pair)
    row["seconds"] = time.perf_counter() - t0
    row.update(stats_of(transform_points(result.transform, pair.fixed_points), pair))
    return row


def run_isolated(tool: str, name: str, stages: list[str], threads: int, timeout: float, direction: str = "fwd") -> dict:
    import peer_tools

    cmd = [
        sys.executable,
        __file__,
        "--one",
        tool,
        name,
        "+".join(stages),
        "--threads",
        str(threads),
        "--direction",
        direction,
    ]
    return peer_tools.run_child(cmd, tool, timeout)


def cell(row: dict | None, key: str) -> str:
    if not row:
        return "-"
    if row.get("failed"):
        return "FAIL"
    if row.get("missing"):
        return "n/a"
    v = row.get(key)
    return "-" if v is None else f"{v:.3g}"


def table(results: dict) -> str:
    lines = [f"{'pair':34s} {'stages':15s} {'tool':10s} {'mean':>7s} {'median':>7s} {'p90':>7s} {'s':>7s}  setting"]
    for key, rows in results.items():
        name, stages = key.split(":")
        for tool in TOOLS:
            r = rows.get(tool)
            if r is None:
                continue
            note = r.get("failed") or r.get("missing") or r.get("setting", "")
            lines.append(
                f"{name:34s} {stages:15s} {tool:10s} {cell(r, 'mean'):>7s} {cell(r, 'median'):>7s} "
                f"{cell(r, 'p90'):>7s} {cell(r, 'seconds'):>7s}  {note}"
            )
    return "\n".join(lines)


def check(threads: int, timeout: float) -> None:
    """Each peer on the known-shift pair with both point conventions: the right one must give ~0, the other ~2x."""
    pair = load(CHECK_PAIR, ["rigid"])
    before = float(np.linalg.norm(pair.fixed_points - pair.moving_points, axis=1).mean())
    print(
        f"# convention check on {CHECK_PAIR} (pure shift, TRE before registration {before:.2f}); "
        f"the wrong convention doubles the error"
    )
    ok = True
    for tool in ("elastix", "ants"):
        for stages in (["rigid"], ["affine", "bspline"]):
            right = run_isolated(tool, CHECK_PAIR, stages, threads, timeout, "fwd")
            wrong = run_isolated(tool, CHECK_PAIR, stages, threads, timeout, "inv")
            print(
                f"{tool:8s} {'+'.join(stages):15s} used convention {cell(right, 'mean'):>8s}   "
                f"other convention {cell(wrong, 'mean'):>8s}"
            )
            ok &= bool(right.get("mean") is not None and right["mean"] < 0.5)
    print("conventions OK" if ok else "CONVENTION CHECK FAILED")
    if not ok:
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only pairs whose name contains this")
    ap.add_argument("--stages", default="", help="run only this stage list, e.g. affine+bspline")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per registration before it counts as failed")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--one", nargs=3, metavar=("TOOL", "PAIR", "STAGES"), help=argparse.SUPPRESS)
    ap.add_argument("--direction", default="fwd", help=argparse.SUPPRESS)
    args = ap.parse_args()
    require_shared_data()
    if args.one:
        tool, name, stages = args.one
        print(json.dumps(run_one(tool, name, stages.split("+"), args.threads, args.direction)))
        return
    if args.check:
        check(args.threads, args.timeout)
        return
    path = RESULTS / "peers.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.report:
        print(table(results))
        return
    import peer_tools

    print(f"# peers ({stamp()}, {machine()}, {args.threads} threads per registration; {peer_tools.versions()})")
    for name, stages in selected(args.only, args.stages):
        key = f"{name}:{'+'.join(stages)}"
        for tool in args.tools.split(","):
            row = run_isolated(tool, name, stages, args.threads, args.timeout)
            results.setdefault(key, {})[tool] = row
            path.write_text(json.dumps(results, indent=2))
            print(table({key: {tool: row}}).splitlines()[1], flush=True)


if __name__ == "__main__":
    main()
