"""Write the quickstart data: a 2D T1/PD-like pair (128x128) with an affine ground truth.

Run ``python examples/quickstart/make_data.py``; it (re)writes, next to this script,
``fixed.png``, ``moving.png``, ``fixed_landmarks.csv``, ``moving_landmarks.csv`` and
``pair.yaml``. PNG keeps no spacing or origin: both images have spacing 1 and origin 0,
and the landmarks are in those physical (= pixel) coordinates.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    from autoreg.synthetic import make_pair, write_pair
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(HERE.parents[1]))
    from autoreg.synthetic import make_pair, write_pair

PAIR_YAML = """\
name: quickstart
fixed: fixed.png
moving: moving.png
landmarks:
  fixed: fixed_landmarks.csv
  moving: moving_landmarks.csv
stages: [affine]
"""


def write_quickstart(folder: str | Path = HERE) -> dict[str, Path]:
    """Generate the quickstart pair into ``folder``; return the written paths by role."""
    folder = Path(folder)
    pair = make_pair((128, 128), transform="affine", seed=0, multimodal=True, n_landmarks=20)
    paths = write_pair(pair, folder, fmt="png")
    paths["pair"] = folder / "pair.yaml"
    paths["pair"].write_text(PAIR_YAML)
    return paths


if __name__ == "__main__":
    for role, path in write_quickstart().items():
        print(f"{role}: {path}")
