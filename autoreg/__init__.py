"""autoreg: a measured search for the best SimpleITK registration recipe of a dataset.

The Python API (SPEC.md): ``autoreg.tune(pair, trials=..., jobs=...)`` -> ``TuneResult``,
``autoreg.register(recipe, fixed_image, moving_image, fixed_mask=None, moving_mask=None)`` -> ``sitk.Transform``,
``autoreg.Recipe`` (``Recipe.load``/``save``). They load on first use, so that ``import autoreg`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_API = {
    "tune": "api",
    "register": "api",
    "Recipe": "recipe",
    "TuneResult": "tuning",
    "TuneEvent": "tuning",
    "UserError": "errors",
    "RegistrationFailed": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from importlib import import_module

        value = getattr(import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autoreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
