"""Can a study tell, before registering, whether its pair shares one modality (the premise of Demons)?

    python benchmarks/modality.py

Per pair of ../shared/data and of the 3D set (benchmarks/data3d): the rank correlation (Spearman) between the fixed
image and the moving image placed by the geometry initializer, both smoothed by one cell of a grid of at most 128
cells per axis, over the fixed image's foreground (the minority side of its Otsu threshold: bright tissue on a dark
background, or dark tissue on a bright slide). Demons moves the field by the intensity difference, so a test worth
building would put every pair of one modality above some value and every multi-modal pair below it. The table
says whether one does; nothing here tunes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAIR_STAGES, RESULTS, require_shared_data, write_pair_yaml  # noqa: E402

DATA3D = Path(__file__).resolve().parent / "data3d"
#: How each pair was imaged: what the test would have to recover.
MULTIMODAL = {"itk_brain_t1_pd_shift13x17": "T1 / PD", "mmdef3d": "T1 / PD-like remap"}


def otsu(values: np.ndarray) -> float:
    counts, edges = np.histogram(values, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    mean_below = np.cumsum(counts * centres)
    with np.errstate(all="ignore"):
        between = below * above * (mean_below / below - (mean_below[-1] - mean_below) / above) ** 2
    return float(centres[np.nanargmax(between)])


def foreground_rank_correlation(fixed: sitk.Image, moving: sitk.Image, cells: int = 128) -> float:
    """Spearman correlation of the two images over the fixed foreground, after the geometry initializer."""
    from scipy.stats import spearmanr

    dim = fixed.GetDimension()
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(dim), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    shrink = [max(1, int(np.ceil(n / cells))) for n in fixed.GetSize()]
    sigma = [s * sp for s, sp in zip(shrink, fixed.GetSpacing())]
    f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(sitk.Cast(fixed, sitk.sitkFloat32), sigma), shrink)
    m = sitk.SmoothingRecursiveGaussian(sitk.Cast(moving, sitk.sitkFloat32), sigma)
    a = sitk.GetArrayFromImage(f).ravel()
    b = sitk.GetArrayFromImage(sitk.Resample(m, f, init, sitk.sitkLinear, float("nan"))).ravel()
    inside = np.isfinite(b)
    bright = a > otsu(a[inside])
    fg = inside & (bright if bright[inside].mean() < 0.5 else ~bright)
    return float(spearmanr(a[fg], b[fg]).statistic)


def pairs() -> list[tuple[str, Path]]:
    out = []
    folder = RESULTS / "modality"
    for name in PAIR_STAGES:
        out.append((name, write_pair_yaml(folder, name, ["affine"])))
    for case in sorted(p.name for p in DATA3D.iterdir() if (p / "pair.yaml").is_file()) if DATA3D.is_dir() else []:
        out.append((case, DATA3D / case / "pair.yaml"))
    return out


def main() -> int:
    from autoreg.pipeline import Pipeline

    require_shared_data()
    rows = []
    for name, path in pairs():
        pair = Pipeline.load(path).pairs[0]
        rho = foreground_rank_correlation(pair.fixed, pair.moving)
        kind = "two stains" if name.startswith(("birl_", "cima_")) else "one modality"
        rows.append((name, MULTIMODAL.get(name, kind), rho))
    print("| pair | imaged as | foreground Spearman after the geometry initializer |")
    print("|---|---|---:|")
    for name, kind, rho in rows:
        print(f"| {name} | {kind} | {rho:+.2f} |")
    groups: dict[str, list[float]] = {}
    for name, kind, rho in rows:
        groups.setdefault("multi-modal" if name in MULTIMODAL else kind, []).append(rho)
    if "multi-modal" in groups and len(groups) > 1:
        top = max(groups["multi-modal"])
        print()
        for kind, values in groups.items():
            if kind != "multi-modal":
                gap = min(values) - top
                print(
                    f"{kind}: lowest {min(values):+.2f}, {gap:+.2f} from the highest multi-modal value ({top:+.2f}): "
                    + ("separated" if gap > 0 else "not separated")
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
