from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from training.xyz_grid import Checkpoint, GridPlan, draw_grid, fixed_legend

CHECKPOINTS = {("ti", step): Checkpoint("ti", step, Path(f"/x/{step}.pt"), "pip", final=step == 100) for step in (50, 100)}
VALUES = {"checkpoint": (50, 100), "prompt": ("a [name]", "b [name]", "c"), "seed": (1, 2), "cfg_scale": (7.0,),
          "steps": (12,), "strength": (1.0,), "method": ("ti",)}


def test_cells_follow_the_axes_and_fixed_values() -> None:
    plan = GridPlan("checkpoint", "prompt", "seed", VALUES, CHECKPOINTS)
    cells = plan.cells()
    assert [len(cells), len(cells[0]), len(cells[0][0])] == [2, 3, 2]  # z=seed, y=prompt, x=checkpoint
    cell = cells[1][2][0]
    assert (cell.seed, cell.prompt, cell.prompt_index, cell.checkpoint.step, cell.cfg_scale) == (2, "c", 2, 50, 7.0)
    assert plan.fixed() == {"cfg_scale": 7.0, "steps": 12, "strength": 1.0, "method": "ti"}
    assert fixed_legend(plan) == ["CFG 7, steps 12, strength 1, ti"]
    assert plan.label("checkpoint", 100) == "step 100 (final)"


def test_a_parameter_with_several_values_must_be_on_an_axis() -> None:
    with pytest.raises(ValueError, match="2 seed values but seed is on no grid axis"):
        GridPlan("checkpoint", "prompt", None, VALUES, CHECKPOINTS)
    with pytest.raises(ValueError, match="grid axes must differ"):
        GridPlan("seed", "seed", None, VALUES, CHECKPOINTS)
    with pytest.raises(ValueError, match="unknown grid axis 'sampler'"):
        GridPlan("sampler", "seed", None, VALUES, CHECKPOINTS)
    with pytest.raises(ValueError, match="ti: no checkpoint at step 75"):
        GridPlan("checkpoint", "prompt", "seed", {**VALUES, "checkpoint": (75,)}, CHECKPOINTS).cells()


def test_drawing_places_every_cell_and_grows_with_the_z_blocks() -> None:
    plan = GridPlan("checkpoint", "prompt", "seed", VALUES, CHECKPOINTS)
    colours = [[[Image.new("RGB", (64, 64), (10 * z, 40 * y, 100 * x)) for x in range(2)] for y in range(3)] for z in range(2)]
    grid = draw_grid(plan, colours, "title", fixed_legend(plan))
    flat = GridPlan("checkpoint", "prompt", "seed", {**VALUES, "seed": (1,)}, CHECKPOINTS)
    single = draw_grid(flat, colours[:1], "title", fixed_legend(flat))
    assert grid.width == single.width and grid.height > single.height + 3 * 128
    pixels = {grid.getpixel((x, y)) for x in range(0, grid.width, 16) for y in range(0, grid.height, 16)}
    assert {(10 * z, 40 * y, 100 * x) for z in range(2) for y in range(3) for x in range(2)} <= pixels
