"""The Python API of SPEC.md: ``autoreg.tune``, ``autoreg.register`` and ``autoreg.Recipe``, for notebooks and scripts.

``tune`` is the ``autoreg tune`` command as a function (``tuning.run_tune``); ``register`` is ``autoreg apply`` on
images in memory: the same checks as images read from files (scalar float32, 2D single slices, finite and varying
intensities), masks placed by their physical geometry (``data.place_mask``), and the same engine call, so its
transform is the one ``apply`` writes. Errors in what was given raise ``autoreg.errors.UserError``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import SimpleITK as sitk

from .errors import UserError
from .recipe import Recipe, load_recipe, recipe_from_dict
from .tuning import Progress, TuneResult, run_tune

log = logging.getLogger(__name__)


def tune(
    pair: str | os.PathLike[str] | Mapping[str, Any],
    *,
    trials: int | None = None,
    jobs: int | None = None,
    seed: int | None = None,
    study_dir: str | os.PathLike[str] | None = None,
    storage: str | None = None,
    timeout: float | None = None,
    dask_scheduler: str | None = None,
    progress: Progress | None = None,
    dask_storage: Literal["auto", "scheduler"] = "auto",
) -> TuneResult:
    """Create or resume the study of ``pair`` (a PAIR.yaml path, or a dict with its keys whose paths are relative to
    the working directory) and run trials, as ``autoreg tune`` does; see ``tuning.run_tune``.

    ``result.best_recipe`` (an ``autoreg.Recipe``), ``result.best_score``, ``result.baseline_score`` (trial 0, the
    SimpleITK-notebooks default) and ``result.study`` (the ``optuna.Study``). ``progress=print`` shows the live
    lines."""
    return run_tune(
        pair,
        trials=trials,
        timeout=timeout,
        jobs=jobs,
        seed=seed,
        study_dir=study_dir,
        storage=storage,
        dask_scheduler=dask_scheduler,
        progress=progress,
        dask_storage=dask_storage,
    )


def register(
    recipe: Recipe | str | os.PathLike[str] | Mapping[str, Any],
    fixed_image: sitk.Image,
    moving_image: sitk.Image,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
) -> sitk.Transform:
    """Run ``recipe`` on two images in memory; the transform maps fixed physical points to moving ones, exactly as
    ``autoreg apply`` writes it. ``recipe`` may also be a recipe file or a dict of one. A registration that cannot
    run raises ``autoreg.errors.RegistrationFailed`` with its reason."""
    from .data import check_recipe_fits
    from .registration import register as run

    recipe = _recipe(recipe)
    pair = images_pair(fixed_image, moving_image, fixed_mask, moving_mask)
    for warning in check_recipe_fits(recipe, [pair], source="recipe"):
        log.warning("%s", warning)
    return run(recipe, pair).transform


def _recipe(recipe: Any) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(dict(recipe), source="recipe")
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    raise UserError(f"expected an autoreg.Recipe, a recipe file or a dict (got {type(recipe).__name__})", key="recipe")


def images_pair(fixed: Any, moving: Any, fixed_mask: Any = None, moving_mask: Any = None):
    """A ``PairData`` from images in memory, checked and converted as ``data.read_image`` does images from files;
    masks placed on their images' grids by ``data.place_mask``. Errors name the argument."""
    from .config import PairSpec
    from .data import PairData, place_mask

    f = _image(fixed, "fixed_image")
    m = _image(moving, "moving_image")
    if f.GetDimension() != m.GetDimension():
        raise UserError(
            f"fixed image is {f.GetDimension()}D but moving image is {m.GetDimension()}D", key="moving_image"
        )
    fm = mm = fc = mc = None
    if fixed_mask is not None:
        fm, fc = place_mask(_mask(fixed_mask, "fixed_mask"), f, what="fixed_mask", key="fixed_mask")
    if moving_mask is not None:
        mm, mc = place_mask(_mask(moving_mask, "moving_mask"), m, what="moving_mask", key="moving_mask")
    spec = PairSpec(name="pair", fixed=Path("<fixed_image>"), moving=Path("<moving_image>"))
    return PairData(spec, f, m, fixed_mask=fm, moving_mask=mm, fixed_mask_coverage=fc, moving_mask_coverage=mc)


def _image(image: Any, key: str) -> sitk.Image:
    from .data import MIN_IMAGE_AXIS, check_intensities
    from .registration import as_scalar_float, single_slice_as_2d

    if not isinstance(image, sitk.Image):
        raise UserError(f"expected a SimpleITK image (got {type(image).__name__})", key=key)
    if image.GetDimension() not in (2, 3):
        raise UserError(f"the image is {image.GetDimension()}D; expected a 2D or 3D image", key=key)
    image = single_slice_as_2d(as_scalar_float(image))
    if min(image.GetSize()) < MIN_IMAGE_AXIS:
        raise UserError(
            f"the image has size {image.GetSize()}; every axis needs at least {MIN_IMAGE_AXIS} voxels", key=key
        )
    check_intensities(image, what="the image", key=key)
    return sitk.Cast(image, sitk.sitkFloat32)


def _mask(mask: Any, key: str) -> sitk.Image:
    if not isinstance(mask, sitk.Image):
        raise UserError(f"expected a SimpleITK image (got {type(mask).__name__})", key=key)
    if mask.GetDimension() not in (2, 3):
        raise UserError(f"the mask is {mask.GetDimension()}D; expected a 2D or 3D image", key=key)
    return mask


__all__ = ["Recipe", "TuneResult", "register", "tune"]
