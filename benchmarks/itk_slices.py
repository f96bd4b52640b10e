"""autoreg on the ITK Software Guide's other brain slices: rotated, rotated and scaled, in PD and against T1.

    pip install -e .
    git clone https://github.com/huangguojun/myitk ITK_DATA && git -C ITK_DATA checkout 1894d59
    python benchmarks/itk_slices.py --data ITK_DATA/Data [--trials 20] [--jobs 2]

../shared/data holds the guide's pure shift (``BrainProtonDensitySliceShifted13x17y``); the guide ships more moving
slices of the same PD image with transforms it describes only roughly: ``R10X13Y17`` (10 degrees and a shift),
``R10X13Y17S12`` (the same scaled by 1.2) and ``Rotated10``. The reference transform of each is therefore fitted
here, by a registration autoreg does not use: SimpleITK's mean squares on every pixel of the same-modality pair,
regular-step gradient descent over a [4, 2, 1] pyramid started from seven angles (-15 to 15 degrees), the lowest
metric kept. Landmarks are a 16 px grid inside the brain (fixed PD > 30) mapped by that fit. A TRE here is agreement
with the fit, not with a known truth: a fit error shows as a floor that no recipe gets under.

Per pair (fixed: the PD slice, or the T1 slice for the multi-modal case; stages ``[rigid]``, or ``[similarity]``
for the scaled slice): the TRE before registration, SimpleITK's default (trial 0) and the tuned best, with its
honest score (the landmarks the search never saw). Results to ``benchmarks/results/itk_slices.json``, the table to
stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save_results, saved_results, stamp, tune  # noqa: E402

OUT = RESULTS / "itk_slices.json"
WORK = RESULTS / "itk_slices"
PD, T1 = "BrainProtonDensitySliceBorder20.png", "BrainT1SliceBorder20.png"
#: Moving slice -> (the transform fitted, the stage tuned).
MOVING = {
    "r10": ("BrainProtonDensitySliceR10X13Y17.png", "euler", "rigid"),
    "r10s12": ("BrainProtonDensitySliceR10X13Y17S12.png", "similarity", "similarity"),
    "rot10": ("BrainProtonDensitySliceRotated10.png", "euler", "rigid"),
}
CASES = {f"{f}_{m}": (fixed, m) for f, fixed in (("pd", PD), ("t1", T1)) for m in MOVING}
GRID_PX, INSIDE = 16, 30


def fit(data: Path, moving_file: str, kind: str):
    """The reference transform of a PD slice pair: mean squares, every pixel, seven starting angles."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(data / PD), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(data / moving_file), sitk.sitkFloat32)
    best = None
    for degrees in (-15, -10, -5, 0, 5, 10, 15):
        start = sitk.Euler2DTransform() if kind == "euler" else sitk.Similarity2DTransform()
        centre = sitk.CenteredTransformInitializerFilter.GEOMETRY
        start = type(start)(sitk.CenteredTransformInitializer(fixed, moving, start, centre))
        start.SetAngle(np.radians(degrees))
        rm = sitk.ImageRegistrationMethod()
        rm.SetMetricAsMeanSquares()
        rm.SetMetricSamplingStrategy(rm.NONE)
        rm.SetInterpolator(sitk.sitkLinear)
        rm.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-6, 2000, relaxationFactor=0.7)
        rm.SetOptimizerScalesFromPhysicalShift()
        rm.SetShrinkFactorsPerLevel([4, 2, 1])
        rm.SetSmoothingSigmasPerLevel([2, 1, 0])
        rm.SetInitialTransform(start, inPlace=False)
        found = rm.Execute(fixed, moving)
        if best is None or rm.GetMetricValue() < best[0]:
            best = (rm.GetMetricValue(), found)
    return best


def build(data: Path, case: str) -> tuple[Path, dict]:
    import SimpleITK as sitk
    import yaml

    fixed_file, m = CASES[case]
    moving_file, kind, stage = MOVING[m]
    folder = WORK / case
    folder.mkdir(parents=True, exist_ok=True)
    metric, tx = fit(data, moving_file, kind)
    pd = sitk.GetArrayFromImage(sitk.ReadImage(str(data / PD)))
    height, width = pd.shape
    xs, ys = range(40, width - 30, GRID_PX), range(40, height - 30, GRID_PX)
    points = np.array([(x, y) for x in xs for y in ys if pd[y, x] > INSIDE], dtype=float)
    mapped = np.array([tx.TransformPoint(tuple(map(float, p))) for p in points])
    for role, p in (("fixed", points), ("moving", mapped)):
        np.savetxt(folder / f"{role}_landmarks.csv", p, delimiter=",", header="x,y", comments="", fmt="%.6f")
    doc = {
        "name": case,
        "fixed": str((data / fixed_file).resolve()),
        "moving": str((data / moving_file).resolve()),
        "landmarks": {"fixed": str(folder / "fixed_landmarks.csv"), "moving": str(folder / "moving_landmarks.csv")},
        "stages": [stage],
    }
    path = folder / "pair.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path, {"fit_metric": metric, "fit_parameters": list(tx.GetParameters()), "landmarks": len(points)}


def one_case(data: Path, case: str, trials: int, jobs: int) -> dict:
    import shutil

    import studyinfo

    from autoreg.config import load_config
    from autoreg.data import load_pair
    from autoreg.objective import identity_tre
    from autoreg.trial import best_and_baseline, records

    shutil.rmtree(WORK / case, ignore_errors=True)  # a fresh study: tune would resume an earlier one
    path, row = build(data, case)
    proc, wall = tune(path, path.parent / "study", trials, jobs, check=False)
    best, base = best_and_baseline(records(studyinfo.load(path.parent / "study", case)))
    pair = load_pair(load_config(path).pairs[0])
    row.update(
        case=case,
        stage=MOVING[CASES[case][1]][2],
        exit=proc.returncode,
        wall_s=round(wall, 1),
        before=identity_tre(pair),
        default=base.value if base else None,
        tuned=best.value if best else None,
        honest=best.tre_report_mean if best else None,
    )
    return row


def table(rows: list[dict]) -> str:
    def f(v) -> str:
        return "-" if v is None else f"{v:.3g}"

    lines = [
        "| case | stage | landmarks | before | SimpleITK default | tuned | honest | study wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['stage']} | {r['landmarks']} | {f(r['before'])} | {f(r['default'])} | "
            f"{f(r['tuned'])} | {f(r['honest'])} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="ITK's Examples/Data folder (or a copy of it) holding the PNG slices")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only print the table of the saved results")
    args = ap.parse_args()
    saved = saved_results(OUT)
    if not args.report:
        if args.data is None or not (args.data / PD).is_file():
            ap.error(f"--data: expected a folder holding {PD} (ITK's Examples/Data)")
        print(f"# itk_slices: {args.trials} trials, --jobs {args.jobs} ({stamp()}, {machine()})", flush=True)
        for case in CASES:
            saved[case] = one_case(args.data.resolve(), case, args.trials, args.jobs)
            save_results(OUT, saved)
            print(table([saved[case]]).splitlines()[-1], flush=True)
    print(table([saved[c] for c in CASES if c in saved]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
