"""PAIR.yaml -> config -> data -> fingerprint -> search space, built in one place for every command and worker.

Each step is computed on first use and kept, so ``export`` (pairs only) pays for no fingerprint and a worker builds
the whole chain once; the steps themselves live in ``config``, ``data``, ``fingerprint`` and ``space``.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from pathlib import Path

from .config import StudyConfig, load_config
from .data import PairData, load_pair
from .fingerprint import DatasetFingerprint, fingerprint_dataset, provenance
from .space import SearchSpace, build_space


class Pipeline:
    """The chain for one PAIR.yaml; ``seed`` overrides the file's study seed (``tune --seed``)."""

    def __init__(self, cfg: StudyConfig, *, seed: int | None = None):
        self.cfg = cfg if seed is None else replace(cfg, seed=seed)

    @classmethod
    def load(cls, pair_file: str | Path, *, seed: int | None = None) -> Pipeline:
        return cls(load_config(pair_file), seed=seed)

    @cached_property
    def pairs(self) -> list[PairData]:
        """The tuning pairs, read and checked (cached per process by ``data``)."""
        return [load_pair(p) for p in self.cfg.pairs]

    @cached_property
    def holdout_pairs(self) -> list[PairData]:
        return [load_pair(p) for p in self.cfg.holdout]

    @cached_property
    def fingerprint(self) -> DatasetFingerprint:
        return fingerprint_dataset(self.pairs)

    @cached_property
    def space(self) -> SearchSpace:
        return build_space(self.cfg, self.fingerprint)

    @cached_property
    def provenance(self) -> dict:
        """What the study is tuned on: per pair, files with digests and geometry (stored with the study)."""
        return provenance(self.pairs, self.fingerprint)
