"""TRE after each initializer alone (no optimization) on the 2D pairs of ../shared/data.

    python benchmarks/initializers.py

Shows what the initializer choices the search offers can do before any optimizer runs: image centres
(geometry), centres of mass (moments), and the exhaustive rotation search at a coarse level with and without the
shift searched together with it (Mattes MI, the default recipe's metric).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAIR_STAGES, machine, pair_files, require_shared_data, stamp  # noqa: E402

from autoreg.config import PairSpec  # noqa: E402
from autoreg.data import load_pair  # noqa: E402
from autoreg.recipe import Initializer, RotationSearch, default_recipe  # noqa: E402
from autoreg.registration import Frame as _Frame  # noqa: E402  (the engine's own initializer)
from autoreg.registration import initial_linear
from autoreg.scoring import tre  # noqa: E402

SEARCHES = {
    "centres only": None,
    "rotation +-180 deg (step 15)": RotationSearch(max_angle_deg=180, step_deg=15),
    "rotation + shift 15 % (7x7)": RotationSearch(
        max_angle_deg=180, step_deg=15, max_shift_fraction=0.15, shift_steps=3
    ),
}


def main() -> None:
    require_shared_data()
    print(f"# initializers: mean TRE (px) after the initializer alone ({stamp()}, {machine()})")
    print(f"{'pair':34s} {'kind':9s} " + " ".join(f"{k:>30s}" for k in SEARCHES))
    for name in PAIR_STAGES:
        files = pair_files(name)
        if files["fixed"].suffix != ".png":
            continue
        pair = load_pair(
            PairSpec(
                name=name,
                fixed=files["fixed"],
                moving=files["moving"],
                fixed_landmarks=files["fixed_landmarks"],
                moving_landmarks=files["moving_landmarks"],
            )
        )
        for kind in ("geometry", "moments"):
            cells = []
            for search in SEARCHES.values():
                recipe = default_recipe(["affine"], 2).with_(
                    initializer=Initializer(kind=kind, rotation_search=search).model_dump()
                )
                t0 = time.perf_counter()
                state = initial_linear(recipe, _Frame(pair), recipe.seed)
                seconds = time.perf_counter() - t0
                err = tre(state.as_affine(), pair.fixed_points, pair.moving_points, pair.fixed).mean
                cells.append(f"{err:8.1f} ({seconds:4.1f} s)")
            print(f"{name:34s} {kind:9s} " + " ".join(f"{c:>30s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
