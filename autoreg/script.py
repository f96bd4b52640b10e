"""A recipe as a standalone Python script that needs only SimpleITK and numpy.

The script is the engine's own source (the ``registration`` package imports nothing of autoreg for this reason: its
modules are concatenated in dependency order, their imports of each other dropped) followed by the recipe as data and
a small ``main``, so it registers exactly as ``autoreg apply`` does:

    python recipe.py FIXED MOVING TRANSFORM_OUT
"""

from __future__ import annotations

import importlib
import inspect
import json
import re

from . import registration
from .data import tuned_masks
from .recipe import Recipe

#: An import of one engine module by another (one line, or a parenthesised list over several).
_INTERNAL_IMPORT = re.compile(r"^from \.\w* import (\([^)]*\)|[^\n]*)\n", re.M)


def engine_source() -> str:
    """The engine's modules as one module: one ``__future__`` import, the modules' own imports of each other gone."""
    parts = ["from __future__ import annotations\n"]
    for name in registration.ENGINE_MODULES:
        source = inspect.getsource(importlib.import_module(f"{registration.__name__}.{name}"))
        source = source.replace("from __future__ import annotations\n", "")
        # imports inside functions keep their indentation and stay: they name modules that are defined above
        source = _INTERNAL_IMPORT.sub("", source)
        source = re.sub(r"^(\s+)from \.\w* import [^\n]*\n", "", source, flags=re.M)
        parts.append(f"\n# --- engine: {name} " + "-" * (100 - len(name)) + "\n" + source)
    return "".join(parts)


_MAIN = '''

# --- the recipe (exported by autoreg) -------------------------------------------------------------------------

RECIPE = json.loads(
    {recipe_json!r}
)
#: The masks of the pairs the recipe was tuned on, as its provenance lists them ("" where none).
TUNED_WITH_MASKS = {tuned_with_masks!r}


def _namespace(value):
    """Nested dicts as attribute objects: the engine reads recipes as ``recipe.stages[0].metric.kind``."""
    from types import SimpleNamespace

    if isinstance(value, dict):
        return SimpleNamespace(**{{k: _namespace(v) for k, v in value.items()}})
    if isinstance(value, list):
        return tuple(_namespace(v) for v in value)
    return value


def _read(path):
    """An image file as autoreg reads it: a JPEG in pixels, as PNG loads."""
    return in_pixels(sitk.ReadImage(path), path)


def _mask_for(mask, image):
    """A mask one slice thick is the 2D mask of a 2D image (autoreg's ``place_mask``)."""
    return single_slice_as_2d(mask) if image.GetDimension() == 2 else mask


def main(argv=None):
    import argparse
    from types import SimpleNamespace

    parser = argparse.ArgumentParser(description="Register MOVING to FIXED with the recipe exported by autoreg.")
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("transform_out", help="output transform, maps fixed physical points to moving ones")
    parser.add_argument("--image-out", help="the moving image resampled onto the fixed grid")
    parser.add_argument("--fixed-mask", help="voxels > 0 are registered (placed by their physical geometry)")
    parser.add_argument("--moving-mask", help="voxels > 0 are registered (placed by their physical geometry)")
    args = parser.parse_args(argv)
    fixed, moving = (as_scalar_float(single_slice_as_2d(_read(path))) for path in (args.fixed, args.moving))
    masks = {{
        which: mask_on_grid(_mask_for(_read(path), image), image) if path else None
        for which, path, image in (("fixed", args.fixed_mask, fixed), ("moving", args.moving_mask, moving))
    }}
    if TUNED_WITH_MASKS and not any(masks.values()):
        print(f"warning: the recipe was tuned with {{TUNED_WITH_MASKS}}; give them (--fixed-mask, --moving-mask) "
              "to register as it was tuned", file=sys.stderr)
    pair = SimpleNamespace(
        fixed=fixed, moving=moving, fixed_mask=masks["fixed"], moving_mask=masks["moving"], fixed_points=None,
        moving_points=None, dim=fixed.GetDimension(), name="pair",
    )
    try:
        result = register(_namespace(RECIPE), pair)
    except RegistrationFailed as err:
        print(f"registration failed: {{err.reason}}", file=sys.stderr)
        return 1
    sitk.WriteTransform(result.transform, args.transform_out)
    if args.image_out:
        sitk.WriteImage(sitk.Resample(moving, fixed, result.transform, sitk.sitkLinear, 0.0), args.image_out)
    print(f"registered in {{result.seconds:.2f}} s; transform written to {{args.transform_out}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def recipe_to_script(recipe: Recipe) -> str:
    """The standalone script: header, the engine's source, the recipe, ``main``."""
    engine = engine_source()
    data = recipe.model_dump(mode="json")  # every field, None included: the engine reads them as attributes
    prov = data.get("provenance") or {}
    header = (
        "#!/usr/bin/env python3\n"
        "# Exported by autoreg: a SimpleITK registration recipe as a standalone script (SimpleITK + numpy only).\n"
        "# Usage: python recipe.py FIXED MOVING TRANSFORM_OUT [--image-out WARPED] [--fixed-mask M] [--moving-mask M]\n"
        f"# Study {prov.get('study', '?')}, trial {prov.get('trial', '?')}, score {prov.get('score', '?')}; "
        f"versions {json.dumps(prov.get('versions', {}))}\n"
    )
    main = _MAIN.format(recipe_json=json.dumps(data, sort_keys=False), tuned_with_masks=tuned_masks(prov))
    return header + engine + "\nimport json  # noqa: E402\n" + main
