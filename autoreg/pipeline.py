"""PAIR.yaml -> config -> data -> fingerprint -> search space, built in one place for every command and worker.

Each step is computed on first use and kept, so ``export`` (pairs only) pays for no fingerprint and a worker builds
the whole chain once; the steps themselves live in ``config``, ``data``, ``fingerprint`` and ``space``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from .config import StudyConfig, load_config
from .data import PairData, check_recipe_fits, load_pair
from .errors import UserError
from .fingerprint import DatasetFingerprint, fingerprint_dataset, provenance
from .landmarks import MIN_LANDMARKS_TO_SPLIT, split_landmarks
from .recipe import Recipe, fits_stages, load_recipe
from .space import SearchSpace, build_space
from .trial import USER_PREFIX, WARM_PREFIX


@dataclass(frozen=True)
class StartingPoint:
    """A trial queued before the search: a user's recipe, run as it is (``enqueue``), or an earlier study's recipe
    given to the sampler as a point of this study's space (``warm_start``: ``params``)."""

    role: str
    recipe: Recipe
    params: dict[str, Any] | None = None


def split_pair(pair: PairData, cfg: StudyConfig) -> PairData:
    """A pair with its landmarks split into selection points and report points (unchanged when there are too few)."""
    fraction = cfg.objective.report_fraction
    if not pair.has_landmarks or fraction <= 0:
        return pair
    select, report = split_landmarks(pair.fixed_points, fraction, cfg.seed)
    if len(report) == 0:
        return pair
    return replace(
        pair,
        fixed_points=pair.fixed_points[select],
        moving_points=pair.moving_points[select],
        report_fixed_points=pair.fixed_points[report],
        report_moving_points=pair.moving_points[report],
        report_rows=report,
    )


def _one_dimension(pairs: list[PairData], dim: int | None, cfg: StudyConfig) -> None:
    """One recipe serves one dimension: a 3D pair in a study of 2D pairs (or the reverse) is a user error."""
    for pair in pairs:
        if dim is not None and pair.dim != dim:
            raise UserError(
                f"{pair.spec.fixed} is {pair.dim}D but the study's first pair is {dim}D; one study tunes one recipe, "
                "for images of one dimension",
                file=cfg.path,
                key=pair.spec.key_of("fixed"),
            )


class Pipeline:
    """The chain for one PAIR.yaml; ``seed`` overrides the file's study seed (``tune --seed``)."""

    def __init__(self, cfg: StudyConfig, *, seed: int | None = None):
        self.cfg = cfg if seed is None else replace(cfg, seed=seed)

    @classmethod
    def load(cls, pair_file: str | Path, *, seed: int | None = None) -> Pipeline:
        return cls(load_config(pair_file), seed=seed)

    @cached_property
    def all_landmark_pairs(self) -> list[PairData]:
        """The tuning pairs with every landmark (fingerprint, report pictures), all of one dimension."""
        pairs = [load_pair(p) for p in self.cfg.pairs]
        _one_dimension(pairs, pairs[0].dim if pairs else None, self.cfg)
        return pairs

    @cached_property
    def pairs(self) -> list[PairData]:
        """The tuning pairs as trials see them: each pair's landmarks split into the selection set (its points) and
        the report set the search never sees (``objective.report_fraction``, seeded by the study seed)."""
        return [split_pair(pair, self.cfg) for pair in self.all_landmark_pairs]

    @cached_property
    def split(self) -> dict[str, dict]:
        """Per pair, which landmarks (0-based rows of its files) the search never sees, or why there are none: kept
        with the study and the exported recipe, so that anyone can score the report set again."""
        out: dict[str, dict] = {}
        for full in self.all_landmark_pairs:
            if not full.has_landmarks or self.cfg.objective.report_fraction <= 0:
                continue
            select, report = split_landmarks(full.fixed_points, self.cfg.objective.report_fraction, self.cfg.seed)
            if len(report):
                out[full.name] = {"select": len(select), "report": [int(i) for i in report]}
            else:
                out[full.name] = {
                    "select": len(select),
                    "report": [],
                    "note": f"not split: fewer than {MIN_LANDMARKS_TO_SPLIT} landmarks; the score is "
                    "measured on the landmarks it selects with",
                }
        return out

    @cached_property
    def holdout_pairs(self) -> list[PairData]:
        pairs = [load_pair(p) for p in self.cfg.holdout]
        _one_dimension(pairs, self.all_landmark_pairs[0].dim if self.cfg.pairs else None, self.cfg)
        return pairs

    @cached_property
    def fingerprint(self) -> DatasetFingerprint:
        return fingerprint_dataset(self.all_landmark_pairs)

    @cached_property
    def space(self) -> SearchSpace:
        return build_space(self.cfg, self.fingerprint)

    @cached_property
    def starting_points(self) -> list[StartingPoint]:
        """``enqueue`` and ``warm_start`` recipes, read and checked against the study's stages."""
        out = []
        for key, paths in (("enqueue", self.cfg.enqueue), ("warm_start", self.cfg.warm_start)):
            for path in paths:
                files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
                if not files:
                    raise UserError(f"no recipe (*.yaml) in the folder {path}", file=self.cfg.path, key=key)
                for file in files:
                    recipe = load_recipe(file)
                    check_recipe_fits(recipe, self.all_landmark_pairs[:1], source=str(file))
                    if not fits_stages(recipe.kinds, self.cfg.stages):
                        raise UserError(
                            f"{file}: its stages {list(recipe.kinds)} do not fit the study's stages "
                            f"{list(self.cfg.stages)}",
                            file=self.cfg.path,
                            key=key,
                        )
                    if key == "enqueue":
                        out.append(StartingPoint(f"{USER_PREFIX}{file.name}", recipe))
                    else:
                        out.append(StartingPoint(f"{WARM_PREFIX}{file.name}", recipe, self.space.point_of(recipe)))
        return out

    @cached_property
    def provenance(self) -> dict:
        """What the study is tuned on: per pair, files with digests and geometry, and the landmark split (stored with
        the study)."""
        return {**provenance(self.all_landmark_pairs, self.fingerprint), "landmark_split": self.split}
