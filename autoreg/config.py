"""PAIR.yaml -> a frozen, validated ``StudyConfig``; every error names the file and the key.

This module checks the file's shape (keys, types, stage order) and resolves paths relative to the file.
Whether the images and landmarks it points to are readable and consistent is ``data``'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError, excerpt
from .recipe import check_stage_order, user_error_from_validation
from .yamlio import load_yaml_file

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Study seeds run from 0 to SEED_LIMIT - 1 (what NumPy and Optuna's samplers accept).
SEED_LIMIT = 2**31
#: A study's name names its folder and its entry in a shared database: short enough for both.
MAX_NAME_CHARS = 100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Landmarks(_Strict):
    fixed: str
    moving: str


class _Masks(_Strict):
    fixed: str | None = None
    moving: str | None = None


class _Pair(_Strict):
    name: str | None = None
    fixed: str
    moving: str
    landmarks: _Landmarks | None = None
    masks: _Masks | None = None


class _Range(_Strict):
    """A search-space override: narrow a range, list choices, or fix a value."""

    low: float | None = None
    high: float | None = None
    choices: list[Any] | None = None
    value: Any = None
    log: bool | None = None


class Objective(_Strict):
    """What a trial's score is (PAIR.yaml's ``objective:``)."""

    #: ``auto``: TRE when every pair has landmarks, else the holdout metric.
    kind: Literal["auto", "tre", "holdout"] = "auto"
    #: Several sampling seeds per trial, aggregated so that the winner is stable, not lucky.
    repeats: int = Field(1, ge=1, le=20)
    aggregate: Literal["mean", "mean_plus_std", "worst"] = "mean"
    #: Weight of the standard deviation in ``mean_plus_std``.
    std_weight: float = Field(1.0, ge=0)
    #: Penalty (in the score's units) per percent of folded voxels of deformable stages.
    folding_penalty: float = Field(0.0, ge=0)
    #: A deformable result that folds more than this percent of the fixed voxels is implausible (tissue does not fold
    #: through itself): such a trial is infeasible, chosen as the best only when no trial stayed within the limit.
    max_folding_percent: float = Field(0.1, ge=0, le=100)
    #: The share of each pair's landmarks kept aside (spread over the image, seeded): the search never sees them,
    #: and the best trial's TRE on them is the study's honest score. 0: every landmark selects.
    report_fraction: float = Field(1 / 3, ge=0, le=0.8)
    #: How several pairs' scores combine: ``relative`` (each pair's TRE over its TRE before registration, then the
    #: mean: no single hard pair dominates) or ``mean`` (the plain mean of TREs).
    across_pairs: Literal["relative", "mean"] = "relative"


class _PairFile(_Strict):
    name: str
    fixed: str | None = None
    moving: str | None = None
    landmarks: _Landmarks | None = None
    masks: _Masks | None = None
    pairs: list[_Pair] | None = None
    holdout: list[_Pair] | None = None
    stages: list[str]
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    search: dict[str, _Range | float | int | str | bool | list[Any] | None] | None = None
    objective: Objective = Objective()
    #: Recipe files (relative to this file) enqueued as starting points after the default recipe.
    enqueue: list[str] | None = None
    #: Recipes of earlier studies (files, or folders of them: a recipe library) whose points start the search, so that
    #: a dataset of a kind tuned before needs fewer trials.
    warm_start: list[str] | None = None
    deterministic: bool = False
    prune: bool = True
    #: A trial's registrations stop (and the trial fails) after this many seconds; default: 20x the default
    #: recipe's runtime on the same data, at least 10 s (600 s until that is known).
    trial_timeout: float | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > MAX_NAME_CHARS:
            raise ValueError(f"expected at most {MAX_NAME_CHARS} characters (got {len(v)}; it names the study folder)")
        if not NAME_PATTERN.fullmatch(v):
            raise ValueError(f"expected letters, digits, '_', '-' or '.' (got {excerpt(v)}; it names the study folder)")
        return v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        check_stage_order(v)
        return v


@dataclass(frozen=True)
class PairSpec:
    """One image pair, paths resolved; ``key`` is where it sits in the file (for error messages)."""

    name: str
    fixed: Path
    moving: Path
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    key: str = ""
    source: str = ""

    @property
    def has_landmarks(self) -> bool:
        return self.fixed_landmarks is not None

    def key_of(self, sub: str) -> str:
        return f"{self.key}.{sub}" if self.key else sub


@dataclass(frozen=True)
class SearchOverride:
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    value: Any = None
    fixed: bool = False
    drop: bool = False
    log: bool | None = None


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: Path
    pairs: tuple[PairSpec, ...]
    stages: tuple[str, ...]
    holdout: tuple[PairSpec, ...] = ()
    seed: int = 0
    search: dict[str, SearchOverride] = field(default_factory=dict)
    objective: Objective = Objective()
    enqueue: tuple[Path, ...] = ()
    warm_start: tuple[Path, ...] = ()
    deterministic: bool = False
    prune: bool = True
    trial_timeout: float | None = None

    @property
    def relative(self) -> bool:
        """Pairs' TREs are combined relative to each pair's TRE before registration (several pairs, landmarks)."""
        return self.uses_landmarks and len(self.pairs) > 1 and self.objective.across_pairs == "relative"

    @property
    def score_name(self) -> str:
        """What a trial's value is: ``tre_mean``, ``relative_tre`` (several pairs) or ``holdout_loss``."""
        return ("relative_tre" if self.relative else "tre_mean") if self.uses_landmarks else "holdout_loss"

    @property
    def uses_landmarks(self) -> bool:
        if self.objective.kind == "tre":
            return True
        if self.objective.kind == "holdout":
            return False
        return all(p.has_landmarks for p in self.pairs)


def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel).expanduser()
    return p if p.is_absolute() else (base / p)


def _pair_spec(raw: _Pair | _PairFile, base: Path, key: str, default_name: str, source: str) -> PairSpec:
    lm, mk = raw.landmarks, raw.masks
    assert raw.fixed is not None and raw.moving is not None
    return PairSpec(
        name=getattr(raw, "name", None) or default_name,
        fixed=_resolve(base, raw.fixed),
        moving=_resolve(base, raw.moving),
        fixed_landmarks=_resolve(base, lm.fixed) if lm else None,
        moving_landmarks=_resolve(base, lm.moving) if lm else None,
        fixed_mask=_resolve(base, mk.fixed) if mk and mk.fixed else None,
        moving_mask=_resolve(base, mk.moving) if mk and mk.moving else None,
        key=key,
        source=source,
    )


def _override(key: str, raw: Any, source: str) -> SearchOverride:
    if raw is None or raw is False or raw == "drop":
        return SearchOverride(drop=True)
    if isinstance(raw, _Range):
        if raw.value is not None:
            return SearchOverride(value=raw.value, fixed=True)
        if raw.choices is not None:
            if not raw.choices:
                raise UserError("choices must not be empty", file=source, key=f"search.{key}.choices")
            return SearchOverride(choices=tuple(raw.choices))
        if raw.low is not None and raw.high is not None and raw.low > raw.high:
            raise UserError("low must not exceed high", file=source, key=f"search.{key}")
        return SearchOverride(low=raw.low, high=raw.high, log=raw.log)
    if isinstance(raw, list):
        if not raw:
            raise UserError(
                "an empty list; expected at least one choice or value (or drop)", file=source, key=f"search.{key}"
            )
        return SearchOverride(choices=tuple(raw))
    return SearchOverride(value=raw, fixed=True)


def parse_pair_file(data: Any, path: Path) -> StudyConfig:
    """Validate the parsed YAML of a PAIR.yaml and resolve its paths."""
    source = str(path)
    if not isinstance(data, dict):
        raise UserError("expected a mapping of keys (name, fixed, moving, stages, ...)", file=source)
    try:
        raw = _PairFile.model_validate(data)
    except ValidationError as err:
        raise user_error_from_validation(err, source) from None

    base = path.parent
    single = raw.fixed is not None or raw.moving is not None
    if single and raw.pairs is not None:
        raise UserError("give either top-level fixed/moving or 'pairs', not both", file=source, key="pairs")
    if single:
        for key in ("fixed", "moving"):
            if getattr(raw, key) is None:
                raise UserError("required key is missing (fixed and moving go together)", file=source, key=key)
        pairs = (_pair_spec(raw, base, "", raw.name, source),)
    elif raw.pairs:
        pairs = tuple(_pair_spec(p, base, f"pairs[{i}]", f"pair{i}", source) for i, p in enumerate(raw.pairs))
    else:
        raise UserError("no image pair: give fixed and moving, or a non-empty 'pairs' list", file=source, key="fixed")
    if not single and (raw.landmarks is not None or raw.masks is not None):
        key = "landmarks" if raw.landmarks is not None else "masks"
        raise UserError("with 'pairs', landmarks and masks go inside each pair", file=source, key=key)
    holdout = tuple(
        _pair_spec(p, base, f"holdout[{i}]", f"holdout{i}", source) for i, p in enumerate(raw.holdout or [])
    )
    seen: dict[str, PairSpec] = {}
    for spec in (*pairs, *holdout):
        if spec.name in seen:
            first = seen[spec.name].key_of("name") if seen[spec.name].key else "name"
            raise UserError(
                f"pair name {excerpt(spec.name)} is already used by {first}; names must be unique",
                file=source,
                key=spec.key_of("name"),
            )
        seen[spec.name] = spec

    objective = raw.objective
    missing = next((p for p in pairs if not p.has_landmarks), None)
    if objective.kind == "tre" and missing is not None:
        raise UserError("objective 'tre' needs landmarks for every pair", file=source, key=missing.key_of("landmarks"))
    given = next((p for p in pairs if p.has_landmarks), None)
    if objective.kind == "auto" and missing is not None and given is not None:  # never drop given landmarks silently
        raise UserError(
            f"no landmarks, but {given.key_of('landmarks')} has them; give landmarks for every pair (TRE), or set "
            "objective: {kind: holdout} to tune on the image metric",
            file=source,
            key=missing.key_of("landmarks"),
        )
    search = {k: _override(k, v, source) for k, v in (raw.search or {}).items()}
    return StudyConfig(
        name=raw.name,
        path=path,
        pairs=pairs,
        stages=tuple(raw.stages),
        holdout=holdout,
        seed=raw.seed,
        search=search,
        objective=objective,
        enqueue=tuple(_resolve(base, e) for e in raw.enqueue or []),
        warm_start=tuple(_resolve(base, e) for e in raw.warm_start or []),
        deterministic=raw.deterministic,
        prune=raw.prune,
        trial_timeout=raw.trial_timeout,
    )


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate PAIR.yaml (bounded safe loader); raises UserError with file and key."""
    path = Path(path)
    data = load_yaml_file(path, what="YAML")
    return parse_pair_file(data, path.resolve())
