"""The Markdown tables of BENCHMARKS.md, from the JSON the benchmarks left in benchmarks/results/.

    python benchmarks/tables.py

Accuracy per pair and tool (peers.json), and the tuning figures per pair (tune_all.json). Prints Markdown; nothing
is measured here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAIR_STAGES, RESULTS  # noqa: E402

LABELS = {
    "default": "(a) SimpleITK default",
    "elastix": "(b) elastix default maps",
    "ants": "(c) ANTsPy",
    "autoreg": "(d) autoreg, 60 trials",
    "generalise": "(e) autoreg, tuned on the others",
}
PEERS = ("default", "elastix", "ants")


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1e4:
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def accuracy(peers: dict) -> str:
    out = [
        "| pair | stages | tool | mean | median | p90 | seconds | setting |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name, stage_lists in PAIR_STAGES.items():
        for stages in stage_lists:
            key = f"{name}:{'+'.join(stages)}"
            rows = peers.get(key, {})
            best_peer = min((rows[t]["mean"] for t in PEERS if rows.get(t, {}).get("mean") is not None), default=None)
            for tool, label in LABELS.items():
                r = rows.get(tool)
                if r is None:
                    continue
                if r.get("failed") or r.get("missing"):
                    out.append(
                        f"| {name} | {'+'.join(stages)} | {label} | {r.get('failed') and 'FAIL' or 'n/a'} "
                        f"| | | | {r.get('failed') or r.get('missing')} |"
                    )
                    continue
                mean = _f(r["mean"])
                if tool in ("autoreg", "generalise") and best_peer is not None and r["mean"] < best_peer:
                    mean = f"**{mean}**"
                threads = f", {r['threads']} thr" if r.get("threads") is not None else ""
                out.append(
                    f"| {name} | {'+'.join(stages)} | {label} | {mean} | {_f(r['median'])} | {_f(r['p90'])} "
                    f"| {_f(r.get('seconds'))} | {r.get('setting', '')}{threads} |"
                )
    return "\n".join(out)


def refreshed(tune: dict) -> dict:
    """tune_all.json's rows with the figures read again from their studies (newer figures, same studies)."""
    import studyinfo

    out = {}
    for key, f in tune.items():
        name, stages = key.split(":")
        study_name = f"{name}-{stages.replace('+', '-')}"
        study_dir = RESULTS / "studies" / study_name
        if (study_dir / "journal.log").exists():
            f = {**f, **studyinfo.figures(studyinfo.load(study_dir, study_name))}
        out[key] = f
    return out


def tuning(tune: dict) -> str:
    out = [
        "| pair | stages | trials | default | tuned | tuned / default | failed | pruned | within 10 % at trial "
        "| within 10 % after | 90 % of the gain after | trials/min | wall min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = [f"{n}:{'+'.join(st)}" for n, sts in PAIR_STAGES.items() for st in sts]
    for key in sorted(tune, key=lambda k: order.index(k) if k in order else len(order)):
        f = tune[key]
        name, stages = key.split(":")
        ratio = f["best"] / f["baseline"] if f.get("best") is not None and f.get("baseline") else None
        out.append(
            f"| {name} | {stages} | {f['trials']} | {_f(f['baseline'])} | {_f(f['best'])} | {_f(ratio, 2)} "
            f"| {f['failed']} | {f['pruned']} | {f['within_10pct_at_trial']} "
            f"| {_secs(f.get('within_10pct_s'))} | {_secs(f.get('within_10pct_of_gain_s'))} "
            f"| {f['trials_per_min']:.1f} | {f['wall_s'] / 60:.1f} |"
        )
    return "\n".join(out)


def _secs(v) -> str:
    return "-" if v is None else f"{v / 60:.1f} min"


def main() -> None:
    peers_path, tune_path = RESULTS / "peers.json", RESULTS / "tune_all.json"
    if peers_path.exists():
        print("### Accuracy (TRE in the fixed image's units: px in 2D, mm in 3D)\n")
        print(accuracy(json.loads(peers_path.read_text())))
        print()
    if tune_path.exists():
        print("### Tuning (issue 3)\n")
        print(tuning(refreshed(json.loads(tune_path.read_text()))))


if __name__ == "__main__":
    main()
