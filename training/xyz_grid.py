"""X/Y/Z grids as the webui's "X/Y/Z plot" script draws them: every parameter a cell depends on can be an
axis, the rest are fixed and printed in a legend, so a grid PNG read on its own says what it shows.

Plain data and Pillow only: which cells a grid needs (`GridPlan.cells`) is decided before any model is
loaded, so a cache can tell which of them must actually be rendered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

AXIS_KINDS = ("checkpoint", "prompt", "seed", "cfg_scale", "steps", "strength", "method")
FONT_SIZE = 12
LINE = FONT_SIZE + 4
MARGIN = 6
LABEL_COLUMN = 220
MIN_CELL_SIZE = 128
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class Checkpoint:
    """One saved state of one method's training run: what a cell's weights come from."""

    method: str  # "textual_inversion", ...
    step: int
    path: Path  # the file the evaluation loads
    name: str  # the trigger word ([name] in prompts)
    final: bool = False

    @property
    def label(self) -> str:
        return f"step {self.step}" + (" (final)" if self.final else "")


@dataclass(frozen=True)
class CellSpec:
    """Everything one image depends on besides the base model, sampler and negative prompt."""

    checkpoint: Checkpoint
    prompt: str  # with [name] still in it; substituted when rendering
    seed: int
    cfg_scale: float
    steps: int
    strength: float
    prompt_index: int = 0  # the prompt's position in the evaluation prompts (names files; not a render input)

    @property
    def method(self) -> str:
        return self.checkpoint.method

    def file_stem(self) -> str:
        """A cell's file name on disk: every coordinate, so cells of one grid never collide."""
        return (
            f"{self.method}_step{self.checkpoint.step}_p{self.prompt_index}_seed{self.seed}"
            f"_cfg{self.cfg_scale:g}_steps{self.steps}_s{self.strength:g}"
        )


def value_label(kind: str, value: Any, checkpoint: Checkpoint | None = None) -> str:
    if kind == "checkpoint" and value == FINAL_STEP:
        return "final checkpoint"
    if kind == "checkpoint":
        return checkpoint.label if checkpoint is not None else f"step {value}"
    if kind == "prompt":
        return str(value)
    names = {"seed": "seed", "cfg_scale": "CFG", "steps": "steps", "strength": "strength", "method": ""}
    return f"{names[kind]} {value:g}".strip() if isinstance(value, float) else f"{names[kind]} {value}".strip()


# The checkpoint value meaning "each method's final checkpoint", for grids that compare methods: their runs
# end at different steps, so a step number cannot name the same point of every run.
FINAL_STEP = -1


@dataclass(frozen=True)
class GridPlan:
    """Which values each axis takes; parameters on no axis take their single fixed value.

    `values` maps every axis kind to its values (one value for the fixed ones). Checkpoints are per method,
    so the checkpoint axis holds steps and a cell's checkpoint is looked up by (method, step).
    """

    x: str
    y: str
    z: str | None
    values: dict[str, tuple]  # kind -> values; "checkpoint" holds steps, "method" method names
    checkpoints: dict[tuple[str, int], Checkpoint]

    def __post_init__(self) -> None:
        axes = [axis for axis in (self.x, self.y, self.z) if axis is not None]
        unknown = [axis for axis in axes if axis not in AXIS_KINDS]
        if unknown:
            raise ValueError(f"unknown grid axis {unknown[0]!r}; choose from {', '.join(AXIS_KINDS)}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"grid axes must differ, got x={self.x}, y={self.y}, z={self.z}")
        for kind in AXIS_KINDS:
            values = self.values.get(kind, ())
            if not values:
                raise ValueError(f"the grid has no {kind} values")
            if kind not in axes and len(values) > 1:
                raise ValueError(
                    f"{len(values)} {kind} values but {kind} is on no grid axis: put it on x_axis, y_axis or "
                    "z_axis, or keep one value"
                )

    @property
    def z_values(self) -> tuple:
        return self.values[self.z] if self.z is not None else (None,)

    def fixed(self) -> dict[str, Any]:
        """The parameters on no axis and their value, for the legend."""
        return {kind: values[0] for kind, values in self.values.items() if kind not in (self.x, self.y, self.z)}

    def checkpoint(self, method: str, step: int) -> Checkpoint:
        try:
            return self.checkpoints[(method, step)]
        except KeyError:
            raise ValueError(f"{method}: no checkpoint at step {step} was saved") from None

    def cells(self) -> list[list[list[CellSpec]]]:
        """[z][y][x] cell specifications."""
        base = {kind: values[0] for kind, values in self.values.items()}
        prompts = list(self.values["prompt"])
        grid = []
        for z in self.z_values:
            rows = []
            for y in self.values[self.y]:
                row = []
                for x in self.values[self.x]:
                    chosen = dict(base)
                    chosen[self.x], chosen[self.y] = x, y
                    if self.z is not None:
                        chosen[self.z] = z
                    row.append(CellSpec(
                        checkpoint=self.checkpoint(chosen["method"], chosen["checkpoint"]), prompt=chosen["prompt"],
                        seed=int(chosen["seed"]), cfg_scale=float(chosen["cfg_scale"]), steps=int(chosen["steps"]),
                        strength=float(chosen["strength"]), prompt_index=prompts.index(chosen["prompt"]),
                    ))  # fmt: skip
                rows.append(row)
            grid.append(rows)
        return grid

    def label(self, kind: str, value: Any, method: str | None = None) -> str:
        if kind == "checkpoint":
            owner = method if method is not None else self.values["method"][0]
            return value_label(kind, value, self.checkpoints.get((owner, value)))
        return value_label(kind, value)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1] + " ..."]
    return lines


def _resized(image: Image.Image, size: int) -> Image.Image:
    """NEAREST when enlarging, so tiny images stay crisp pixels instead of blur."""
    if image.size == (size, size):
        return image
    method = Image.Resampling.NEAREST if size > image.width else Image.Resampling.LANCZOS
    return image.resize((size, size), method)


def draw_grid(
    plan: GridPlan, images: Sequence[Sequence[Sequence[Image.Image]]], title: str, legend: Sequence[str],
    cell_size: int | None = None,
) -> Image.Image:
    """One block per Z value (its label above it), columns labelled with X values, rows with Y values, the
    title at the top and the fixed settings (the legend) at the bottom."""
    font = ImageFont.load_default(size=FONT_SIZE)
    size = cell_size or max(images[0][0][0].width, MIN_CELL_SIZE)
    x_values, y_values = plan.values[plan.x], plan.values[plan.y]
    method = plan.values["method"][0]
    block_width = LABEL_COLUMN + len(x_values) * (size + MARGIN)
    header = LINE * 2  # z label + x labels (x labels wrap to two lines)
    block_height = header + len(y_values) * (size + MARGIN) + MARGIN
    legend_lines = [line for text in legend for line in _wrap(text, font, block_width - 2 * MARGIN, 3)]
    width = max(block_width, MARGIN + int(font.getlength(title))) + MARGIN
    height = MARGIN + LINE + len(plan.z_values) * block_height + len(legend_lines) * LINE + MARGIN
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=font)
    max_lines = max(1, size // LINE)
    for block, (z, rows) in enumerate(zip(plan.z_values, images)):
        top = MARGIN + LINE + block * block_height
        if plan.z is not None:
            draw.text((MARGIN, top), plan.label(plan.z, z, method), fill=INK, font=font)
        for column, x in enumerate(x_values):
            left = LABEL_COLUMN + column * (size + MARGIN)
            label = _wrap(plan.label(plan.x, x, method), font, size, 1)[0]
            draw.text((left, top + LINE), label, fill=INK, font=font)
        for row, (y, cells) in enumerate(zip(y_values, rows)):
            y_top = top + header + row * (size + MARGIN)
            for index, line in enumerate(_wrap(plan.label(plan.y, y, method), font, LABEL_COLUMN - 2 * MARGIN, max_lines)):
                draw.text((MARGIN, y_top + index * LINE), line, fill=INK, font=font)
            for column, image in enumerate(cells):
                canvas.paste(_resized(image, size), (LABEL_COLUMN + column * (size + MARGIN), y_top))
    legend_top = MARGIN + LINE + len(plan.z_values) * block_height
    for index, line in enumerate(legend_lines):
        draw.text((MARGIN, legend_top + index * LINE), line, fill=INK, font=font)
    return canvas


def fixed_legend(plan: GridPlan) -> list[str]:
    """"seed 1, CFG 7, ..." for the parameters on no axis."""
    method = plan.values["method"][0]
    parts = [plan.label(kind, value, method) for kind, value in plan.fixed().items() if kind != "prompt"]
    lines = [", ".join(parts)] if parts else []
    if "prompt" in plan.fixed():
        lines.append(f"prompt: {plan.fixed()['prompt']}")
    return lines
