"""The cost model's predictions: what it charges for each part of a recipe (cost.py)."""

from __future__ import annotations

import pytest

from autoreg.cost import CostModel
from autoreg.recipe import Initializer, RotationSearch, default_recipe
from autoreg.registration.initializer import SEARCH_POINTS, TOP_ROTATIONS

BRAIN = (182, 218, 182)


def _with_search(search: RotationSearch | None):
    recipe = default_recipe(["rigid"], 3)
    return recipe.model_copy(update={"initializer": Initializer(kind="geometry", rotation_search=search)})


@pytest.mark.parametrize("shift_steps", [0, 2])
def test_a_budgeted_search_is_charged_for_the_evaluations_it_runs(shift_steps: int) -> None:
    """The two-phase search runs rotations, then shifts around the best three: the model charges that many
    evaluations of ``SEARCH_POINTS`` points, not the joint grid (which over-charged a 3D search ~50x and pruned
    trials that took seconds as if they took minutes)."""
    model = CostModel()
    search = RotationSearch(
        max_angle_deg=90, step_deg=22.5, max_shift_fraction=0.1, shift_steps=shift_steps, max_evaluations=2000
    )
    rotations, shifts = 9**3, 5**3  # 4 steps each side of 3 angles; 2 steps each side of 3 axes
    evaluations = rotations + (TOP_ROTATIONS * (shifts - 1) if shift_steps else 0)
    extra = model.predict_pair(_with_search(search), BRAIN) - model.predict_pair(_with_search(None), BRAIN)
    assert extra == pytest.approx(evaluations * SEARCH_POINTS * model.linear_s_per_sample * 0.5)
    assert extra < rotations * shifts * SEARCH_POINTS * model.linear_s_per_sample * 0.5 / 10 or not shift_steps


def test_an_unbudgeted_search_is_charged_for_every_voxel_of_its_coarse_level() -> None:
    """Version 1's search: the whole joint grid on ITK's coarse level (~64 voxels across), every voxel."""
    model = CostModel()
    search = RotationSearch(max_angle_deg=30, step_deg=15, max_shift_fraction=0.0, shift_steps=0)
    extra = model.predict_pair(_with_search(search), BRAIN) - model.predict_pair(_with_search(None), BRAIN)
    coarse = (182 // 2) * (218 // 2) * (182 // 2)
    assert extra == pytest.approx(5**3 * coarse * model.linear_s_per_sample * 0.5)


def test_a_demons_stage_is_charged_by_the_filter_s_own_coefficient_per_field_voxel() -> None:
    """Demons runs a filter over every voxel of its field, not a v4 metric's samples: its price follows the Demons
    coefficient of its variant and nothing of the metric's (priced as metric samples, a Demons trial was predicted at
    3-7x its seconds and pruned unrun)."""
    from dataclasses import replace

    from autoreg.recipe import default_demons_stage

    affine = default_recipe(["affine"], 3)
    demons = affine.model_copy(update={"stages": (*affine.stages, default_demons_stage(3))})

    def price(model: CostModel, recipe=demons) -> float:
        return model.predict_pair(recipe, BRAIN) - model.predict_pair(affine, BRAIN)

    model = CostModel()
    stage = demons.stages[1]
    doubled = price(replace(model, demons_s_per_voxel=2 * model.demons_s_per_voxel)) - price(model)
    assert doubled > 0.9 * price(model)  # the filter's iterations are nearly all of it
    assert price(replace(model, linear_s_per_sample=10 * model.linear_s_per_sample)) == pytest.approx(price(model))
    diffeomorphic = demons.model_copy(
        update={
            "stages": (
                affine.stages[0],
                stage.model_copy(update={"optimizer": stage.optimizer.model_copy(update={"variant": "diffeomorphic"})}),
            )
        }
    )
    ratio = model.diffeomorphic_demons_s_per_voxel / model.demons_s_per_voxel
    assert price(model, diffeomorphic) == pytest.approx(ratio * price(model), rel=0.1)
