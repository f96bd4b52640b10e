"""The peers' figures on the 3D set (issue 12 items 9-10, issue 13 item 5): what autoreg must beat there.

    python benchmarks/make_3d_set.py                 # the set, under benchmarks/data3d
    python benchmarks/peers3d.py [--data benchmarks/data3d] [--only rot3d,afids] [--tools elastix,ants,default1,default2]
                                 [--threads 2] [--timeout 1800] [--report]

Per case of the set (its stages from its pair.yaml), one registration per tool, each in its own process:

* ``elastix``: itk-elastix's default parameter maps for the stages (rigid / affine / affine + bspline), 2 threads;
* ``ants``: ANTsPy ``registration`` with Rigid / Affine, or SyN for a deformable last stage, 2 threads;
* ``default1`` / ``default2``: the SimpleITK-notebooks default recipe for the stages (autoreg's trial 0), run by
  ``autoreg apply RECIPE --fixed .. --moving .. --transform-out .. --fixed-landmarks .. --moving-landmarks ..
  --threads 1|2``; a run past ``--timeout`` seconds is killed and recorded as such. ``default1+affine`` runs the
  default recipe of other stages (here affine) than the case's.

TRE before (identity) and after, mean / median / p90 / max, from ``autoreg.scoring.tre_stats`` for every tool;
seconds: the registration alone (elastix, ANTs: the call; autoreg: what ``apply`` reports) and the whole command's
wall time for ``apply``; also the child's CPU seconds and the 1-minute load average before and after, as the
machine may be shared. Results go to benchmarks/results/peers3d.json; ``--report`` prints the table again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, machine, require_shared_data, stamp  # noqa: E402

DATA = REPO / "benchmarks" / "data3d"
TOOLS = ("elastix", "ants", "default1", "default2")
_REGISTERED = re.compile(r"registered in ([0-9.]+) s")


def load(case: Path):
    from autoreg.config import load_config
    from autoreg.data import load_pair

    cfg = load_config(case / "pair.yaml")
    return cfg, load_pair(cfg.pairs[0])


def stats(mapped: np.ndarray, pair) -> dict:
    from autoreg.scoring import tre_stats

    s = tre_stats(mapped - pair.moving_points, pair.fixed)
    return {"mean": s.mean, "median": s.median, "p90": s.p90, "max": s.max}


def default_recipe_file(stages: list[str]) -> Path:
    from autoreg.recipe import default_recipe, save_recipe

    path = RESULTS / "peers3d" / f"default-{'-'.join(stages)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_recipe(default_recipe(stages, 3, seed=0), path)
    return path


def run_peer(tool: str, case: Path, threads: int) -> dict:
    """elastix or ANTs on one case, in this process; returns the JSON row."""
    import peer_tools

    cfg, pair = load(case)
    stages = list(cfg.stages)
    spec = cfg.pairs[0]
    fn = peer_tools.run_elastix if tool == "elastix" else peer_tools.run_ants
    mapped, seconds = fn(spec.fixed, spec.moving, pair.fixed_points, stages, threads=threads)
    setting = "+".join(peer_tools.elastix_maps(stages)) if tool == "elastix" else peer_tools.ants_type(stages)
    return {"tool": tool, "threads": threads, "seconds": seconds, "setting": setting, **stats(mapped, pair)}


def run_default(case: Path, threads: int, timeout: float, stages: list[str] | None = None) -> dict:
    """``autoreg apply`` of the default recipe for the case's stages (or ``stages``), as a user would run it,
    under a time limit."""
    import SimpleITK as sitk

    from autoreg.scoring import transform_points

    cfg, pair = load(case)
    spec = cfg.pairs[0]
    stages = stages or list(cfg.stages)
    recipe = default_recipe_file(stages)
    tfm = RESULTS / "peers3d" / f"{case.name}-default-{'-'.join(stages)}-{threads}t.tfm"
    cmd = [
        str(Path(sys.executable).with_name("autoreg")),
        "apply",
        str(recipe),
        "--fixed",
        str(spec.fixed),
        "--moving",
        str(spec.moving),
        "--transform-out",
        str(tfm),
        "--fixed-landmarks",
        str(spec.fixed_landmarks),
        "--moving-landmarks",
        str(spec.moving_landmarks),
        "--threads",
        str(threads),
    ]
    row: dict = {
        "tool": f"default{threads}",
        "threads": threads,
        "setting": f"SimpleITK-notebooks default, {'+'.join(stages)}",
        "command": " ".join(cmd),
    }
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(failed=f"over {timeout:.0f} s (killed)", wall_s=time.perf_counter() - t0)
        return row
    row["wall_s"] = time.perf_counter() - t0
    found = _REGISTERED.search(proc.stdout)
    if proc.returncode != 0 or not found:
        row["failed"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
        return row
    row["seconds"] = float(found.group(1))
    row["apply_output"] = proc.stdout.strip().splitlines()
    row.update(stats(transform_points(sitk.ReadTransform(str(tfm)), pair.fixed_points), pair))
    return row


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_isolated(tool: str, case: Path, threads: int, timeout: float) -> dict:
    """One tool on one case in a child process, with the machine's load and the child's CPU seconds: the machine
    is shared, so wall seconds alone can mislead."""
    load0, cpu0 = os.getloadavg()[0], children_cpu()
    row = _run_isolated(tool, case, threads, timeout)
    return {**row, "cpu_s": children_cpu() - cpu0, "load_before": load0, "load_after": os.getloadavg()[0]}


def _run_isolated(tool: str, case: Path, threads: int, timeout: float) -> dict:
    import peer_tools

    if tool.startswith("default"):  # defaultN, or defaultN+STAGE+STAGE for other stages than the case's
        threads_text, *stages = tool.removeprefix("default").split("+")
        return {**run_default(case, int(threads_text), timeout, stages or None), "tool": tool}
    cmd = [sys.executable, __file__, "--one", tool, str(case), "--threads", str(threads)]
    t0 = time.perf_counter()
    return {**peer_tools.run_child(cmd, tool, timeout), "wall_s": time.perf_counter() - t0}


def before(case: Path) -> dict:
    cfg, pair = load(case)
    return {
        "stages": list(cfg.stages),
        "fixed_size": list(pair.fixed.GetSize()),
        "fixed_spacing": list(pair.fixed.GetSpacing()),
        "moving_size": list(pair.moving.GetSize()),
        "moving_spacing": list(pair.moving.GetSpacing()),
        "n": int(len(pair.fixed_points)),
        **stats(pair.fixed_points, pair),
    }


def _f(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def table(results: dict) -> str:
    lines = [
        "| case | stages | tool | threads | TRE before mean | mean | median | p90 | max | seconds | CPU s | load "
        "| setting |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case, rec in results.items():
        b = rec.get("before", {})
        for tool in [t for t in TOOLS if t in rec] + sorted(t for t in rec if t not in (*TOOLS, "before")):
            r = rec[tool]
            note = r.get("failed") or r.get("setting", "")
            cells = (
                ["FAIL"] * 5 if r.get("failed") else [_f(r.get(k)) for k in ("mean", "median", "p90", "max", "seconds")]
            )
            load = f"{r['load_before']:.1f}-{r['load_after']:.1f}" if "load_before" in r else "-"
            lines.append(
                f"| {case} | {'+'.join(b.get('stages', []))} | {tool} | {r.get('threads', '-')} | "
                f"{_f(b.get('mean'))} | " + " | ".join(cells) + f" | {_f(r.get('cpu_s'))} | {load} | {note} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA), help="the set's folder (make_3d_set.py --out)")
    ap.add_argument("--only", default="", help="comma-separated cases (default: every case folder in --data)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--threads", type=int, default=2, help="threads of elastix and ANTs")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per registration before it is killed")
    ap.add_argument("--json", default=str(RESULTS / "peers3d.json"), help="results file (read, updated, written)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("TOOL", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    require_shared_data()
    if args.one:
        print(json.dumps(run_peer(args.one[0], Path(args.one[1]), args.threads)))
        return
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.report:
        print(table(results))
        return
    data = Path(args.data)
    cases = sorted(p.parent for p in data.glob("*/pair.yaml"))
    if args.only:
        cases = [c for c in cases if c.name in args.only.split(",")]
    if not cases:
        sys.exit(f"no case folders under {data}: run benchmarks/make_3d_set.py first")
    import peer_tools

    print(
        f"# peers3d ({stamp()}, {machine()}, {args.threads} threads for elastix and ANTs; "
        f"{peer_tools.versions()}; limit {args.timeout:.0f} s)",
        flush=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    for tool in args.tools.split(","):
        for case in cases:
            rec = results.setdefault(case.name, {})
            rec["before"] = before(case)
            rec[tool] = {**run_isolated(tool, case, args.threads, args.timeout), "date": stamp()}
            path.write_text(json.dumps(results, indent=2))
            print(table({case.name: {"before": rec["before"], tool: rec[tool]}}).splitlines()[-1], flush=True)
    print(table({c.name: results[c.name] for c in cases}))


if __name__ == "__main__":
    main()
