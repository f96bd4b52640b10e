"""autoreg on histology pairs the project never tuned or benchmarked on, against elastix and ANTs SyN.

    pip install -e ".[bench]"
    python benchmarks/unseen_histology.py --dhl DHL_DIR --birl BIRL_DIR [--only he_cc10] [--trials 60] [--jobs 2]
        [--timeout 240]
    python benchmarks/unseen_histology.py --report

The sources, two public repositories at fixed commits (a checkout, or only the files used, extracted):

    git clone https://github.com/Borda/dataset-histology-landmarks DHL_DIR && git -C DHL_DIR checkout 8413e09
    git clone https://github.com/Borda/BIRL BIRL_DIR && git -C BIRL_DIR checkout f1648b2

or, from bare mirrors of them (``git clone --mirror``):

    git -C DHL_MIRROR archive 8413e09 dataset/lung-lesion_3/scale-5pc annotations/lung-lesion_3/user-PS_scale-50pc \\
        | tar -x -C DHL_DIR
    git -C BIRL_MIRROR archive f1648b2 data-images/images data-images/landmarks | tar -x -C BIRL_DIR

The pairs (fixed -> moving; see ``PAIRS``): four stain pairs of CIMA's lung-lesion_3 (5 % scale; the annotations
of user PS at 50 % scale, times 0.1) that ../shared/data does not hold (it has He->Ki67 and He->CD31 of this set),
and BIRL's three artificial pairs (``pairs-imgs-lnds_mix.csv``: Target = fixed = ``artificial_reference``, Source =
moving; landmarks ``,X,Y`` in pixels, X the column). The rigid and affine artificial pairs are tuned with
``stages: [affine]`` (a known linear motion: a deformable stage has nothing to add, and the peers run their affine
settings there: elastix's affine map, ANTs ``Affine``); the elastic one, and every lung pair, with ``stages: [affine,
deformable]`` against elastix's default affine + bspline maps and ANTs ``SyN``.

Every image is converted to an 8-bit luminance PNG (0.299 R + 0.587 G + 0.114 B, rounded), as ../shared/data's
histology pairs are, and all three tools register the same PNGs: pixels, spacing 1, origin 0 (itk and ANTs would
read the JPEGs at their 72 dpi print size, 0.357 mm pixels, and in colour). Landmarks are the first min(n_f, n_m)
rows of both files (BIRL's rule), written as ``x,y`` physical (= pixel) coordinates.

Per pair, built into ``benchmarks/results/unseen/<pair>/`` (images, landmarks, ``pair.yaml`` with absolute paths,
the study in ``study/``, replaced on every run):

1. the TRE before registration (the identity) and the affine floor (mean residual of the least-squares affine of the
   landmarks themselves);
2. ``autoreg tune`` (``common.tune``: ``--trials N --timeout S --jobs J --seed 0``), the study's trial counts, failure
   and pruning reasons, the default (trial 0) score, the best trial's kinds, its honest score (the landmarks the
   search never saw) and its recorded runtime;
3. the best recipe run again here as the study ran it (its threads and seed): TRE over every landmark and the folded
   share of the fixed grid; and once with 2 ITK threads like the peers: TRE and the seconds of that registration;
4. elastix and ANTsPy (``peer_tools``) with 2 threads, each in its own process (a crash is recorded, not fatal).

Every TRE is ``autoreg.scoring.tre_stats`` of ``T(fixed_i) - moving_i`` over every landmark. Results go to
``benchmarks/results/unseen_histology.json`` after each pair (a run replaces only the pairs it ran), the table to
stdout. Pairs run one after another.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save_results, saved_results, stamp, tune  # noqa: E402

OUT = RESULTS / "unseen_histology.json"
WORK = RESULTS / "unseen"
DEFORMABLE = ["affine", "deformable"]
LINEAR = ["affine"]

_LESION_IMG = "dataset/lung-lesion_3/scale-5pc/29-041-Izd2-w35-{}-les3.jpg"
_LESION_LND = "annotations/lung-lesion_3/user-PS_scale-50pc/29-041-Izd2-w35-{}-les3.csv"
_BIRL_IMG = "data-images/images/artificial_{}.jpg"
_BIRL_LND = "data-images/landmarks/artificial_{}.csv"


def _lesion(fixed: str, moving: str) -> dict:
    return {
        "source": "dhl",
        "fixed": _LESION_IMG.format(fixed),
        "moving": _LESION_IMG.format(moving),
        "fixed_landmarks": _LESION_LND.format(fixed),
        "moving_landmarks": _LESION_LND.format(moving),
        "scale": 0.1,  # annotated at 50 % scale, images at 5 %
        "stages": DEFORMABLE,
    }


def _artificial(moving: str, stages: list[str]) -> dict:
    return {
        "source": "birl",
        "fixed": _BIRL_IMG.format("reference"),
        "moving": _BIRL_IMG.format(f"moving-{moving}"),
        "fixed_landmarks": _BIRL_LND.format("reference"),
        "moving_landmarks": _BIRL_LND.format(f"moving-{moving}"),
        "scale": 1.0,
        "stages": stages,
    }


#: Pair name -> where its files are in its repository, the landmarks' scale to the images, the stages tuned.
PAIRS: dict[str, dict] = {
    "cima_lunglesion3_he_cc10": _lesion("He", "Cc10-5"),
    "cima_lunglesion3_he_prospc": _lesion("He", "proSPC-4"),
    "cima_lunglesion3_ki67_cd31": _lesion("Ki67-7", "CD31-3"),
    "cima_lunglesion3_cc10_prospc": _lesion("Cc10-5", "proSPC-4"),
    "birl_artificial_rigid": _artificial("rigid", LINEAR),
    "birl_artificial_affine": _artificial("affine", LINEAR),
    "birl_artificial_elastic": _artificial("elastic", DEFORMABLE),
}


def _luminance_png(src: Path, dst: Path) -> list[int]:
    """``src`` (RGB or grey) as an 8-bit luminance PNG in pixels; returns its size (x, y)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(src))
    a = sitk.GetArrayFromImage(image).astype(float)
    if image.GetNumberOfComponentsPerPixel() >= 3:
        a = a[..., :3] @ np.array([0.299, 0.587, 0.114])
    out = sitk.GetImageFromArray(np.clip(np.round(a), 0, 255).astype(np.uint8))  # spacing 1, origin 0
    sitk.WriteImage(out, str(dst))
    return list(out.GetSize())


def _read_landmarks(path: Path, scale: float) -> np.ndarray:
    """An ImageJ/BIRL CSV (``index,X,Y``; X the column) as (n, 2) pixel coordinates times ``scale``."""
    import pandas as pd

    table = pd.read_csv(path)
    return table[["X", "Y"]].to_numpy(dtype=float) * scale


def build(name: str, dhl: Path | None, birl: Path | None) -> Path:
    """The pair's folder (fresh): luminance PNGs, ``x,y`` landmark files, ``pair.yaml``, ``SOURCE.txt``."""
    import yaml

    spec = PAIRS[name]
    root = {"dhl": dhl, "birl": birl}[spec["source"]]
    if root is None:
        raise SystemExit(f"{name} needs --{spec['source']} DIR (see the docstring for the git commands)")
    folder = WORK / name
    shutil.rmtree(folder, ignore_errors=True)  # a fresh study: tune would resume an earlier one
    folder.mkdir(parents=True)
    sizes = {role: _luminance_png(root / spec[role], folder / f"{role}.png") for role in ("fixed", "moving")}
    points = {role: _read_landmarks(root / spec[f"{role}_landmarks"], spec["scale"]) for role in ("fixed", "moving")}
    n = min(len(p) for p in points.values())
    for role, p in points.items():
        size = np.array(sizes[role]) - 1
        if (p[:n] < 0).any() or (p[:n] > size).any():
            raise SystemExit(f"{name}: a {role} landmark lies off its image {sizes[role]}")
        rows = "".join(f"{x:.6f},{y:.6f}\n" for x, y in p[:n])
        (folder / f"{role}_landmarks.csv").write_text("x,y\n" + rows, encoding="utf-8")
    doc = {
        "name": name,
        "fixed": str((folder / "fixed.png").resolve()),
        "moving": str((folder / "moving.png").resolve()),
        "landmarks": {
            "fixed": str((folder / "fixed_landmarks.csv").resolve()),
            "moving": str((folder / "moving_landmarks.csv").resolve()),
        },
        "stages": spec["stages"],
    }
    (folder / "pair.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    (folder / "SOURCE.txt").write_text(
        f"{name}: fixed {spec['fixed']}, moving {spec['moving']}\n"
        f"landmarks {spec['fixed_landmarks']}, {spec['moving_landmarks']} (x {spec['scale']}, first {n} rows)\n"
        f"from {root} ({spec['source']}); 8-bit luminance 0.299R+0.587G+0.114B; sizes {sizes}\n",
        encoding="utf-8",
    )
    return folder / "pair.yaml"


def load(pair_yaml: Path):
    from autoreg.config import load_config
    from autoreg.data import load_pair

    return load_pair(load_config(pair_yaml).pairs[0])


def peer(tool: str, pair_yaml: Path, stages: list[str], threads: int) -> dict:
    """One peer on one built pair, in this process: TRE over every landmark (autoreg's code) and its seconds."""
    import peer_tools
    import peers

    pair = load(pair_yaml)
    folder = pair_yaml.parent
    fn = peer_tools.run_elastix if tool == "elastix" else peer_tools.run_ants
    mapped, seconds = fn(folder / "fixed.png", folder / "moving.png", pair.fixed_points, stages, threads=threads)
    setting = "+".join(peer_tools.elastix_maps(stages)) if tool == "elastix" else peer_tools.ants_type(stages)
    return {"tool": tool, **peers.stats_of(mapped, pair), "seconds": seconds, "threads": threads, "setting": setting}


def peer_isolated(tool: str, pair_yaml: Path, stages: list[str], threads: int = 2, timeout: float = 900) -> dict:
    import peer_tools

    cmd = [sys.executable, __file__, "--one", tool, str(pair_yaml), "+".join(stages), "--threads", str(threads)]
    return peer_tools.run_child(cmd, tool, timeout)


def study_summary(trials) -> dict:
    """Counts by state, and why trials failed or were pruned (reason: count), from the study's records."""
    out: dict = {"states": {}, "failed": {}, "pruned": {}, "infeasible": 0, "kinds_run": {}}
    for t in trials:
        out["states"][t.state] = out["states"].get(t.state, 0) + 1
        if t.state == "FAIL":
            why = (t.fail_reason or "no reason recorded") + (f": {t.fail_detail}" if t.fail_detail else "")
            out["failed"][why[:240]] = out["failed"].get(why[:240], 0) + 1
        elif t.state == "PRUNED":
            why = t.pruned_at or "pruned"
            out["pruned"][why] = out["pruned"].get(why, 0) + 1
        elif t.state == "COMPLETE" and not t.feasible:
            out["infeasible"] += 1
        if t.recipe and t.state == "COMPLETE":
            kinds = "+".join(s["transform"]["kind"] for s in t.recipe["stages"])
            out["kinds_run"][kinds] = out["kinds_run"].get(kinds, 0) + 1
    return out


def one_pair(name: str, dhl: Path | None, birl: Path | None, trials: int, jobs: int, timeout: float) -> dict:
    import studyinfo
    from deformable import affine_floor, rerun_best

    from autoreg.recipe import recipe_from_dict
    from autoreg.scoring import tre_stats
    from autoreg.trial import best_and_baseline, records

    stages = PAIRS[name]["stages"]
    pair_yaml = build(name, dhl, birl)
    pair = load(pair_yaml)
    row: dict = {
        "pair": name,
        "stages": stages,
        "landmarks": len(pair.fixed_points),
        "size": list(pair.fixed.GetSize()),
        "before": tre_stats(pair.fixed_points - pair.moving_points, pair.fixed).mean,
        "affine_floor": affine_floor(pair),
    }
    proc, wall = tune(pair_yaml, pair_yaml.parent / "study", trials, jobs, "--timeout", str(timeout), check=False)
    row.update(wall_s=round(wall, 1), exit=proc.returncode)
    if proc.returncode != 0:
        row["tune_stderr"] = proc.stderr.strip()[-600:]
    try:
        trials_ = records(studyinfo.load(pair_yaml.parent / "study", name))
    except Exception as err:  # noqa: BLE001 - no study to read is a result too
        trials_, row["study_error"] = [], repr(err)[:300]
    row["study"] = study_summary(trials_)
    row["trials"] = sum(t.state in ("COMPLETE", "PRUNED", "FAIL") for t in trials_)
    best, base = best_and_baseline(trials_)
    row["default"] = base.value if base else None
    if best is not None:
        recipe = recipe_from_dict(best.recipe)
        row.update(
            best_trial=best.number,
            best_role=best.origin,
            best_kinds=[s["transform"]["kind"] for s in best.recipe["stages"]],
            best_selected=best.tre_mean,
            best_honest=best.tre_report_mean,
            best_feasible=best.feasible,
            best_folding_in_study=best.folding_fraction,
            best_seconds_in_study=best.runtime_s,
            tuned=rerun_best(pair, recipe),
            tuned_2_threads=rerun_best(pair, recipe, threads=2),
        )
    for tool in ("elastix", "ants"):
        row[tool] = peer_isolated(tool, pair_yaml, stages)
    return row


def _f(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def _tool(r: dict) -> str:
    return _f(r.get("mean")) if "mean" in r else (r.get("failed") or "-")


def table(rows: list[dict]) -> str:
    lines = [
        "| pair | stages | landmarks | before | affine floor | default | autoreg tuned (winner kind) | honest | "
        "tuned, 2 threads | elastix | ANTs | tuned folding | tuned s (2 threads) | ANTs s | tuned s / ANTs s | "
        "study: trials (complete/pruned/failed), wall min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, t2 = r.get("tuned") or {}, r.get("tuned_2_threads") or {}
        e, a = r.get("elastix") or {}, r.get("ants") or {}
        kinds = "+".join(r.get("best_kinds", [])) or "no trial completed"
        fold = t.get("folding")
        ratio = t2["seconds"] / a["seconds"] if t2.get("seconds") and a.get("seconds") else None
        states = (r.get("study") or {}).get("states", {})
        counts = "/".join(str(states.get(s, 0)) for s in ("COMPLETE", "PRUNED", "FAIL"))
        lines.append(
            f"| {r['pair']} | {'+'.join(r['stages'])} | {r['landmarks']} | {_f(r['before'])} | "
            f"{_f(r['affine_floor'])} | {_f(r.get('default'))} | {_f(t.get('mean'))} ({kinds}) | "
            f"{_f(r.get('best_honest'))} | {_f(t2.get('mean'))} | {_tool(e)} ({e.get('setting', '-')}) | "
            f"{_tool(a)} ({a.get('setting', '-')}) | {_f(100 * fold, '.3f') + ' %' if fold is not None else '-'} | "
            f"{_f(t2.get('seconds'))} | {_f(a.get('seconds'))} | {_f(ratio, '.2f')} | "
            f"{r['trials']} ({counts}), {r['wall_s'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dhl", type=Path, help="Borda/dataset-histology-landmarks at 8413e09 (checkout or extract)")
    ap.add_argument("--birl", type=Path, help="Borda/BIRL at f1648b2 (checkout or extract)")
    ap.add_argument("--only", default="", help="run only the pairs whose name contains this")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=240.0, help="tune --timeout per pair")
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="only print the table of the saved results")
    ap.add_argument("--one", nargs=3, metavar=("TOOL", "PAIR_YAML", "STAGES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        tool, pair_yaml, stages = args.one
        print(json.dumps(peer(tool, Path(pair_yaml), stages.split("+"), args.threads)))
        return 0
    saved = saved_results(OUT)
    if not args.report:
        names = [n for n in PAIRS if args.only in n]
        names = [n for n in names if {"dhl": args.dhl, "birl": args.birl}[PAIRS[n]["source"]] is not None]
        if not names:
            ap.error("no pair to run: give --dhl and/or --birl (and an --only that matches)")
        print(
            f"# unseen histology: {args.trials} trials, --jobs {args.jobs}, --timeout {args.timeout:g} per pair "
            f"({stamp()}, {machine()})",
            flush=True,
        )
        for name in names:
            t0 = time.perf_counter()
            saved[name] = one_pair(
                name,
                args.dhl and args.dhl.resolve(),
                args.birl and args.birl.resolve(),
                args.trials,
                args.jobs,
                args.timeout,
            )
            saved[name]["pair_wall_s"] = round(time.perf_counter() - t0, 1)
            saved[name]["run"] = stamp()
            save_results(OUT, saved)
            print(table([saved[name]]).splitlines()[-1], flush=True)
    print(table(list(saved.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
