"""What the landmarks themselves allow: how low a mean TRE any registration can be expected to reach on a pair.

    pip install -e ".[bench]"
    python benchmarks/landmark_floor.py [--only ki67] [--no-syn]

Per deformable pair of ../shared/data (the histology pairs and afids) and the 3D set's mmdef3d (a known smooth
deformation, exact landmarks; ``make_3d_set.py``), from the landmarks and the images alone,
with no study:

1. **affine floor**: the mean residual of the least-squares affine fit of all the landmarks (in sample: what no
   affine can beat on these points);
2. **leave-one-out affine**: each landmark predicted by the affine fitted to the others;
3. **leave-one-out smooth deformation**: the same affine plus a thin-plate spline through the others' residuals
   (scipy's ``RBFInterpolator`` at several smoothings): how well the annotated displacements of the neighbours
   predict a landmark, i.e. how much of the residual is a smooth deformation at the landmarks' spacing and how much
   is local motion or annotation error;
4. **where the image metric goes**: Mattes MI, started at the landmarks' own affine and optimised (affine, images
   smoothed by 1 voxel, at most 200,000 samples): the TRE at the metric's nearby optimum and the metric's gain. A worse TRE at
   a better metric value means the intensities disagree with the annotations, which no optimizer fixes;
5. **SyN from the ideal start** (skipped with ``--no-syn``): ANTs ``SyNOnly`` started from the landmarks' affine,
   what a peer's deformable step adds from the best affine there is;
6. **our fields from the ideal start**: autoreg's displacement stage alone on the same start, at the sampling a
   study affords: ANTs SyN's defaults as ANTs runs them (``recipe.ants_field_stage``: update variance 3, no total
   smoothing, one field continued down a pyramid that stops at half resolution), the same on to full resolution,
   with update variance 9 (inside the searched range), with its levels composed and its total smoothed by a
   variance of 1 (``recipe.default_field_stage``, a study's default point), the same differentiating through ITK's
   Gaussian gradient images (SimpleITK's default, which antsRegistration and the search leave off), the notebook's
   field (``recipe.default_stage``), and the same defaults moved by SyN's symmetric scheme (``recipe.ants_syn_stage``,
   total variance 1, and SyN's own 0), with their seconds and folded voxels.

Results go to ``benchmarks/results/landmark_floor.json``, the table to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HISTOLOGY, RESULTS, machine, require_shared_data, save_results, saved_results, stamp  # noqa: E402

#: The 3D set's case with a known deformation (``make_3d_set.py``, built when missing): its landmarks are exact.
MMDEF3D = "mmdef3d"
PAIRS = [*HISTOLOGY, "afids_mni152nlin6asym_colin27_t1", MMDEF3D]
SMOOTHINGS = (0.0, 1e2, 1e3, 1e4)
OUT = RESULTS / "landmark_floor.json"


def _affine_fit(f: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Least-squares (dim + 1, dim) matrix mapping [f, 1] to m."""
    design = np.hstack([f, np.ones((len(f), 1))])
    coef, *_ = np.linalg.lstsq(design, m, rcond=None)
    return coef


def _apply(coef: np.ndarray, f: np.ndarray) -> np.ndarray:
    return np.hstack([f, np.ones((len(f), 1))]) @ coef


def leave_one_out(f: np.ndarray, m: np.ndarray, smoothing: float | None) -> np.ndarray:
    """Each landmark's error when predicted from the others: affine alone (``smoothing`` None), or affine plus a
    thin-plate spline through the others' affine residuals."""
    from scipy.interpolate import RBFInterpolator

    errors = []
    for i in range(len(f)):
        keep = np.arange(len(f)) != i
        coef = _affine_fit(f[keep], m[keep])
        predicted = _apply(coef, f[i : i + 1])
        if smoothing is not None:
            residual = m[keep] - _apply(coef, f[keep])
            predicted = predicted + RBFInterpolator(f[keep], residual, kernel="thin_plate_spline", smoothing=smoothing)(
                f[i : i + 1]
            )
        errors.append(float(np.linalg.norm(predicted - m[i])))
    return np.asarray(errors)


def landmark_affine(pair):
    """The least-squares affine of the landmarks as a SimpleITK transform (fixed -> moving physical points)."""
    import SimpleITK as sitk

    dim = pair.fixed.GetDimension()
    coef = _affine_fit(pair.fixed_points, pair.moving_points)
    tx = sitk.AffineTransform(dim)
    tx.SetMatrix(coef[:dim].T.ravel().tolist())
    tx.SetTranslation(coef[dim].tolist())
    return tx


def metric_from(pair, start) -> dict:
    """Mattes MI optimised from ``start`` (affine, 1-voxel smoothing, every voxel up to 200,000, a regular grid of
    that many beyond): TRE and metric before and after."""
    import SimpleITK as sitk

    from autoreg.scoring import transform_points, tre_stats

    sigma = float(min(pair.fixed.GetSpacing()))
    fixed = sitk.SmoothingRecursiveGaussian(sitk.Cast(pair.fixed, sitk.sitkFloat32), sigma)
    moving = sitk.SmoothingRecursiveGaussian(sitk.Cast(pair.moving, sitk.sitkFloat32), sigma)

    def method() -> sitk.ImageRegistrationMethod:
        rm = sitk.ImageRegistrationMethod()
        rm.SetMetricAsMattesMutualInformation(32)
        share = min(1.0, 200_000 / fixed.GetNumberOfPixels())
        if share < 1.0:
            rm.SetMetricSamplingStrategy(rm.REGULAR)
            rm.SetMetricSamplingPercentage(share, 1)
        else:
            rm.SetMetricSamplingStrategy(rm.NONE)
        rm.SetInterpolator(sitk.sitkLinear)
        rm.SetOptimizerAsRegularStepGradientDescent(
            learningRate=sigma, minStep=1e-3 * sigma, numberOfIterations=300, relaxationFactor=0.7
        )
        rm.SetOptimizerScalesFromPhysicalShift()
        return rm

    before = method()
    before.SetInitialTransform(sitk.AffineTransform(start))
    value_before = before.MetricEvaluate(fixed, moving)
    rm = method()
    rm.SetInitialTransform(sitk.AffineTransform(start), inPlace=False)
    found = rm.Execute(fixed, moving)

    def mean(tx) -> float:
        return tre_stats(transform_points(tx, pair.fixed_points) - pair.moving_points, pair.fixed).mean

    return {
        "tre_start": mean(start),
        "tre_at_optimum": mean(found),
        "metric_start": value_before,
        "metric_at_optimum": rm.GetMetricValue(),
        "iterations": rm.GetOptimizerIteration(),
    }


def _with_gradient_images(stage):
    """``stage`` differentiating each level through ITK's Gaussian gradient images (SimpleITK's default), which
    antsRegistration and autoreg's search leave off."""
    metric = stage.metric.model_copy(
        update={"use_fixed_image_gradient_filter": True, "use_moving_image_gradient_filter": True}
    )
    return stage.model_copy(update={"metric": metric})


def fields_from(pair, start) -> dict:
    """autoreg's displacement stage alone (2 threads) on the moving image resampled through ``start``: the TRE over
    every landmark and the seconds of each field way."""
    import dataclasses
    import time

    from deformable import resampled_through

    from autoreg.fingerprint import fingerprint_dataset
    from autoreg.recipe import (
        DisplacementTransform,
        Initializer,
        Recipe,
        ants_field_stage,
        ants_syn_stage,
        default_field_stage,
        default_stage,
    )
    from autoreg.registration import register
    from autoreg.scoring import folding_fraction, transform_points, tre_stats
    from autoreg.space import SearchSpace

    dim = pair.fixed.GetDimension()
    space = SearchSpace(fingerprint=fingerprint_dataset([pair]), stages=("displacement",))
    ants = space.affordable(ants_field_stage(dim))  # as a study's default point runs it: dense where affordable
    wider = ants.transform.model_copy(update={"variance_for_update_field": 9.0})
    assert isinstance(wider, DisplacementTransform)
    full = ants.pyramid.model_copy(update={"shrink_factors": (4, 2, 1), "smoothing_sigmas": (2.0, 1.0, 0.0)})
    ways = {
        "ants_defaults": ants,
        "ants_full_resolution": ants.model_copy(update={"pyramid": full}),
        "ants_update_variance_9": ants.model_copy(update={"transform": wider}),
        "composed_total_variance_1": space.affordable(default_field_stage(dim)),
        "composed_with_gradient_images": _with_gradient_images(space.affordable(default_field_stage(dim))),
        "notebook": default_stage("displacement", dim),
    }
    syn = space.affordable(ants_syn_stage(dim))
    unsmoothed = syn.transform.model_copy(update={"variance_for_total_field": 0.0})
    ways["symmetric"] = syn
    ways["symmetric_total_variance_0"] = syn.model_copy(update={"transform": unsmoothed})
    warped = dataclasses.replace(pair, moving=resampled_through(pair, start), moving_mask=None, fixed_mask=None)
    out = {}
    for name, stage in ways.items():
        recipe = Recipe(initializer=Initializer(kind="none"), stages=(stage,), threads=2)
        t0 = time.perf_counter()
        field = register(recipe, warped).transform
        seconds = time.perf_counter() - t0
        mapped = transform_points(start, transform_points(field, pair.fixed_points))
        out[name] = {
            "mean": tre_stats(mapped - pair.moving_points, pair.fixed).mean,
            "seconds": seconds,
            "folding_percent": 100.0 * folding_fraction(field, pair.fixed),
        }
    return out


def load(name: str):
    """A shared-data pair, or the 3D set's mmdef3d (built first when missing)."""
    if name != MMDEF3D:
        import peers

        return peers.load(name, ["affine"])
    import make_3d_set
    import tune3d

    from autoreg.config import load_config
    from autoreg.data import load_pair

    return load_pair(load_config(make_3d_set.ensure(tune3d.DATA3D, name) / "pair.yaml").pairs[0])


def one_pair(name: str, syn: bool) -> dict:
    pair = load(name)
    f, m = pair.fixed_points, pair.moving_points
    floor = np.linalg.norm(_apply(_affine_fit(f, m), f) - m, axis=1)
    row: dict = {
        "pair": name,
        "landmarks": len(f),
        "unit": "px" if name in HISTOLOGY else "mm",
        "before": float(np.linalg.norm(f - m, axis=1).mean()),
        "affine_floor": float(floor.mean()),
        "affine_floor_p90": float(np.percentile(floor, 90)),
        "loo_affine": float(leave_one_out(f, m, None).mean()),
        "loo_smooth": {f"{s:g}": float(leave_one_out(f, m, s).mean()) for s in SMOOTHINGS},
    }
    start = landmark_affine(pair)
    row["metric"] = metric_from(pair, start)
    if syn:
        from deformable import syn_from

        row["syn_from_landmark_affine"] = syn_from(pair, start)
    row["fields_from_landmark_affine"] = fields_from(pair, start)
    return row


def _f(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    smooth = " | ".join(f"LOO affine + TPS (smoothing {s:g})" for s in SMOOTHINGS)
    lines = [
        f"| pair | landmarks | before | affine floor (p90) | LOO affine | {smooth} | MI from the landmarks' affine: "
        "TRE at its optimum (metric gain) | SyN from the landmarks' affine (s) |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(SMOOTHINGS) + "---:|---:|",
    ]
    for r in rows:
        met, syn = r["metric"], r.get("syn_from_landmark_affine") or {}
        gain = met["metric_start"] - met["metric_at_optimum"]
        loo = " | ".join(_f(r["loo_smooth"][f"{s:g}"]) for s in SMOOTHINGS)
        lines.append(
            f"| {r['pair']} ({r['unit']}) | {r['landmarks']} | {_f(r['before'])} | {_f(r['affine_floor'])} "
            f"({_f(r['affine_floor_p90'])}) | {_f(r['loo_affine'])} | {loo} | {_f(met['tre_at_optimum'])} "
            f"({gain:+.4f}) | {_f(syn.get('mean'))} ({_f(syn.get('seconds'), '.1f')}) |"
        )
    return "\n".join(lines)


#: Part 6's ways, as columns: key in the results, header.
FIELD_WAYS = {
    "ants_defaults": "one-sided, ANTs' defaults to half resolution",
    "ants_full_resolution": "the same on to full resolution",
    "ants_update_variance_9": "update variance 9",
    "composed_total_variance_1": "levels composed, total variance 1 (the default point)",
    "composed_with_gradient_images": "the default point with ITK's gradient images",
    "notebook": "the notebook's field",
    "symmetric": "symmetric (SyN's scheme), total variance 1",
    "symmetric_total_variance_0": "symmetric, total variance 0 (SyN's own)",
}


def fields_table(rows: list[dict]) -> str:
    """Part 6: each way's TRE (seconds, folded %) from the landmarks' affine, beside SyN's from there."""
    lines = [
        "| pair | affine floor | SyN from it (s) | "
        + " | ".join(f"{h} (s, folded %)" for h in FIELD_WAYS.values())
        + " |",
        "|---|---:|---:|" + "---:|" * len(FIELD_WAYS),
    ]
    for r in rows:
        syn, fields = r.get("syn_from_landmark_affine") or {}, r.get("fields_from_landmark_affine") or {}
        cells = []
        for key in FIELD_WAYS:
            w = fields.get(key, {})
            fold = w.get("folding_percent")
            cells.append(f"{_f(w.get('mean'))} ({_f(w.get('seconds'), '.1f')}, {_f(fold, '.3f')})")
        lines.append(
            f"| {r['pair']} ({r['unit']}) | {_f(r['affine_floor'])} | {_f(syn.get('mean'))} "
            f"({_f(syn.get('seconds'), '.1f')}) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--no-syn", action="store_true", help="leave out ANTs SyN from the landmarks' affine")
    parser.add_argument("--report", action="store_true", help="only print the table of the saved results")
    args = parser.parse_args()
    saved = saved_results(OUT)
    if not args.report:
        require_shared_data()
        print(f"# landmark_floor ({stamp()}, {machine()})", flush=True)
        for name in PAIRS:
            if args.only in name:
                saved[name] = one_pair(name, syn=not args.no_syn)
                save_results(OUT, saved)
    rows = [saved[n] for n in PAIRS if n in saved]
    print(table(rows))
    print()
    print(fields_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
