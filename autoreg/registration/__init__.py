"""The engine: the only code that drives ``sitk.ImageRegistrationMethod``. It imports nothing of autoreg outside
this package, so ``export --format python`` ships its modules (``ENGINE_MODULES``, in dependency order) as one
standalone script."""

from .core import (
    LINEAR_KINDS,
    SLICE_PLANE_KEY,
    Clock,
    Halt,
    LevelCallback,
    LevelRecord,
    RegistrationFailed,
    RegistrationPruned,
    RegistrationResult,
    as_scalar_float,
    failure_reason,
    in_pixels,
    itk_seed,
    itk_threads,
    mask_on_grid,
    single_slice_as_2d,
    slice_plane,
    threads_of,
)
from .engine import register
from .frame import Frame, Linear, compose, frame_of, frame_scale, scale_image, unscale_transform
from .initializer import BEST_STARTS, initial_linear, search_grid, search_work
from .pyramid import axis_factors, bspline_mesh, bspline_schedule, level_sizes, refine_bspline, sampling_fraction

#: The engine's modules in the order a standalone script defines them.
ENGINE_MODULES = ("core", "frame", "pyramid", "method", "initializer", "fields", "engine")

__all__ = [
    "BEST_STARTS",
    "ENGINE_MODULES",
    "LINEAR_KINDS",
    "Clock",
    "Frame",
    "Halt",
    "LevelCallback",
    "LevelRecord",
    "Linear",
    "RegistrationFailed",
    "RegistrationPruned",
    "RegistrationResult",
    "SLICE_PLANE_KEY",
    "as_scalar_float",
    "axis_factors",
    "mask_on_grid",
    "bspline_mesh",
    "bspline_schedule",
    "compose",
    "failure_reason",
    "frame_of",
    "frame_scale",
    "in_pixels",
    "initial_linear",
    "itk_seed",
    "itk_threads",
    "level_sizes",
    "refine_bspline",
    "register",
    "sampling_fraction",
    "scale_image",
    "search_grid",
    "search_work",
    "single_slice_as_2d",
    "slice_plane",
    "threads_of",
    "unscale_transform",
]
