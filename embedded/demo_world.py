"""The demo world: procedural scenes of shapes, colours, textures and a few composed characters on varied
backgrounds, each drawn with its true booru-style tag list, so a tagger and a base model can be trained on it
and a textual-inversion concept can be seen to appear (issue 9).

Why a world of our own: a random tiny base model cannot learn anything a person can see. Images whose true
attributes are known by construction let the project train small models itself, offline and deterministically,
and measure them (tagger precision/recall, tags of generated images) against the truth.

Everything is a pure function of (seed, index): image `index` of world `seed` draws from its own
`numpy.random.default_rng([seed, index])`, never from global state, so it is the same whatever else is drawn.
Coordinates are fractions of the side, so one scene looks the same at 64 and at 512 pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.atomic import write_text
from embedded.staging import staged_folder
from tagging.captions import CaptionOptions, format_tag
from tagging.categories import CHARACTER_CATEGORY, GENERAL_CATEGORY, RATING_CATEGORY

# Named palette. Shapes use the first eight; backgrounds may also be black or grey.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (50, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (245, 150, 205),
    "white": (245, 245, 245),
    "black": (25, 25, 30),
    "grey": (128, 128, 132),
}
SHAPE_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
BACKGROUND_COLOURS = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "star", "ring")
TEXTURES = ("solid", "striped", "dotted", "checkered")  # "solid" has no tag of its own
BACKGROUNDS = ("simple", "gradient", "noisy", "patterned")  # tagged "<kind>_background"
MAX_SHAPES = 3
COUNT_TAGS = ("1_shape", "2_shapes", "3_shapes")
RATING_TAG = "general"  # every world image is rated general, as WD14 models rate safe images
SOLO_TAG = "solo"
TEXTURE_SHADE = 0.5  # a texture's second colour: the main colour darkened by this factor
SUPERSAMPLE = 4  # masks are drawn this much larger and box-filtered down: smooth edges at any side
MIN_SIDE, MAX_SIDE = 32, 1024


@dataclass(frozen=True)
class Character:
    """A composed character: a body shape, a head shape with two eyes, an accessory, fixed colours."""

    name: str  # its character tag, e.g. "bolt_(world)"
    body: str  # a SHAPES entry
    body_colour: str
    head: str
    head_colour: str
    accessory: str  # an ACCESSORIES entry, also a general tag
    accessory_colour: str


ACCESSORIES = ("hat", "bow", "antenna")
CHARACTERS: tuple[Character, ...] = (
    Character("bolt_(world)", "square", "blue", "circle", "yellow", "hat", "red"),
    Character("mira_(world)", "triangle", "pink", "circle", "white", "bow", "purple"),
    Character("tock_(world)", "circle", "green", "square", "orange", "antenna", "red"),
    Character("zuzu_(world)", "star", "yellow", "circle", "purple", "hat", "green"),
)
# The new concept of the demo: the tagger knows it, the base model is never trained on it, and the demo
# dataset teaches it to the base model as a textual-inversion embedding.
DEMO_CONCEPT = "zuzu_(world)"
BASE_CHARACTERS = tuple(c.name for c in CHARACTERS if c.name != DEMO_CONCEPT)
ALL_CHARACTERS = tuple(c.name for c in CHARACTERS)
_BY_NAME = {c.name: c for c in CHARACTERS}


@dataclass(frozen=True)
class WorldObject:
    """One thing drawn in a scene, in fractions of the side: centre (x, y) and radius."""

    kind: str  # "shape", "character" or "figure" (an unnamed character of random parts)
    name: str  # the shape (a SHAPES entry), the character's name, or "figure"
    colour: str  # the shape's colour; a character's or figure's body colour
    texture: str  # a TEXTURES entry ("solid" for characters and figures)
    x: float
    y: float
    radius: float
    parts: Character | None = None  # a figure's parts

    @property
    def character(self) -> Character:
        """The character or figure drawn (its parts and colours)."""
        return self.parts if self.parts is not None else _BY_NAME[self.name]


@dataclass(frozen=True)
class Scene:
    """What an image shows, independent of its size."""

    background: str  # a BACKGROUNDS entry
    background_colour: str
    pattern: int  # variant of the background (gradient direction, pattern kind), 0..3
    objects: tuple[WorldObject, ...]
    texture_seed: int  # seeds the noisy background's noise

    @property
    def shapes(self) -> tuple[WorldObject, ...]:
        return tuple(o for o in self.objects if o.kind == "shape")

    @property
    def tags(self) -> tuple[str, ...]:
        """The true tags, in a natural order: characters, shapes, count, background, rating last."""
        tags: list[str] = []
        for thing in self.objects:
            if thing.kind == "character":
                tags += [thing.name, _BY_NAME[thing.name].accessory, SOLO_TAG]
            elif thing.kind == "figure":  # described by its parts: the body's colour and shape, then the head's
                who = thing.character
                tags += [f"{who.body_colour}_{who.body}", f"{who.head_colour}_{who.head}", who.accessory, SOLO_TAG]
        for shape in self.shapes:
            tags += [f"{shape.colour}_{shape.name}", shape.name]
            if shape.texture != "solid":
                tags.append(shape.texture)
        if self.shapes:
            tags.append(COUNT_TAGS[len(self.shapes) - 1])
        tags += [f"{self.background_colour}_background", f"{self.background}_background", RATING_TAG]
        return tuple(dict.fromkeys(tags))


@dataclass(frozen=True)
class WorldImage:
    seed: int
    index: int
    scene: Scene
    image: Image.Image  # RGB, side x side

    @property
    def tags(self) -> tuple[str, ...]:
        return self.scene.tags


def vocabulary() -> tuple[tuple[str, int], ...]:
    """Every tag the world can produce as (name, category), in selected_tags.csv order: rating, general,
    character. A tagger trained on the world predicts exactly these."""
    general = [f"{colour}_{shape}" for shape in SHAPES for colour in SHAPE_COLOURS]
    general += list(SHAPES) + [t for t in TEXTURES if t != "solid"] + list(COUNT_TAGS)
    general += [f"{colour}_background" for colour in BACKGROUND_COLOURS] + [f"{b}_background" for b in BACKGROUNDS]
    general += list(ACCESSORIES) + [SOLO_TAG]
    return (
        ((RATING_TAG, RATING_CATEGORY),)
        + tuple((name, GENERAL_CATEGORY) for name in general)
        + tuple((name, CHARACTER_CATEGORY) for name in ALL_CHARACTERS)
    )


def character(name: str) -> Character:
    if name not in _BY_NAME:
        raise ValueError(f"unknown world character {name!r}; known: {', '.join(ALL_CHARACTERS)}")
    return _BY_NAME[name]


# ----------------------------------------------------------------------------------------------- sampling


def sample_scene(
    rng: np.random.Generator,
    *,
    characters: Sequence[str] = BASE_CHARACTERS,
    character_probability: float = 0.35,
) -> Scene:
    """A random scene: 1-3 shapes, or one of `characters` with 0-1 shapes, on a background whose colour no
    object shares (so every colour tag is visible). `characters=()` draws shapes only."""
    for name in characters:
        character(name)  # fail early on a typo
    objects: list[WorldObject] = []
    if characters and rng.random() < character_probability:
        who = _BY_NAME[characters[int(rng.integers(len(characters)))]]
        radius = float(rng.uniform(0.27, 0.36))
        x = float(rng.uniform(radius, 1 - radius))
        y = float(rng.uniform(radius, 1 - radius))
        objects.append(WorldObject("character", who.name, who.body_colour, "solid", x, y, radius))
        wanted = int(rng.integers(0, 2))
    else:
        wanted = int(rng.integers(1, MAX_SHAPES + 1))
    for _ in range(wanted):
        radius = float(rng.uniform(0.11, 0.17) if objects or wanted > 1 else rng.uniform(0.15, 0.3))
        spot = _free_spot(rng, radius, objects)
        if spot is None:
            continue
        colour = SHAPE_COLOURS[int(rng.integers(len(SHAPE_COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        texture = TEXTURES[0] if rng.random() < 0.5 else TEXTURES[int(rng.integers(1, len(TEXTURES)))]
        objects.append(WorldObject("shape", shape, colour, texture, *spot, radius))
    used = {o.colour for o in objects} | {c for o in objects for c in _character_colours(o)}
    free = [c for c in BACKGROUND_COLOURS if c not in used]
    return Scene(
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        background_colour=free[int(rng.integers(len(free)))],
        pattern=int(rng.integers(4)),
        objects=tuple(objects),
        texture_seed=int(rng.integers(2**31)),
    )


def _character_colours(thing: WorldObject) -> tuple[str, ...]:
    if thing.kind == "shape":
        return ()
    who = thing.character
    return who.body_colour, who.head_colour, who.accessory_colour


# What the demo base model is trained on: one object per scene, so every caption word has one referent, and
# backgrounds weighted towards the plain ones the evaluation prompts ask for.
BASE_OBJECT_KINDS = {"shape": 0.45, "figure": 0.35, "character": 0.2}
BASE_BACKGROUNDS = {"simple": 0.4, "gradient": 0.3, "noisy": 0.15, "patterned": 0.15}


def random_figure(rng: np.random.Generator) -> Character:
    """An unnamed character of random parts (body and head shapes and colours, an accessory and its colour),
    never one whose body and head both match a named character's: the base model learns how characters are
    composed without ever seeing the demo concept (or any named character) drawn under another caption."""
    while True:
        body, head = (SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=2))
        body_colour, head_colour, accessory_colour = (
            SHAPE_COLOURS[int(i)] for i in rng.choice(len(SHAPE_COLOURS), size=3, replace=False))
        accessory = ACCESSORIES[int(rng.integers(len(ACCESSORIES)))]
        if not any((c.body, c.body_colour, c.head, c.head_colour) == (body, body_colour, head, head_colour)
                   for c in CHARACTERS):
            return Character("figure", body, body_colour, head, head_colour, accessory, accessory_colour)


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    return names[int(rng.choice(len(names), p=np.asarray(list(weights.values())) / sum(weights.values())))]


def sample_base_scene(rng: np.random.Generator, *, characters: Sequence[str] = BASE_CHARACTERS,
                      kinds: dict[str, float] = BASE_OBJECT_KINDS) -> Scene:
    """A scene for the demo base model: one large shape, figure or named character (drawn with `kinds`'
    weights) on a background (`BASE_BACKGROUNDS`) whose colour the object does not use."""
    kind = _pick(rng, kinds) if characters else "shape"
    if kind == "shape":
        radius = float(rng.uniform(0.18, 0.34))
        colour = SHAPE_COLOURS[int(rng.integers(len(SHAPE_COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        texture = TEXTURES[0] if rng.random() < 0.5 else TEXTURES[int(rng.integers(1, len(TEXTURES)))]
        thing = WorldObject("shape", shape, colour, texture, *_free_spot(rng, radius, []), radius)
    else:
        radius = float(rng.uniform(0.27, 0.36))
        who = random_figure(rng) if kind == "figure" else character(characters[int(rng.integers(len(characters)))])
        thing = WorldObject(kind, who.name, who.body_colour, "solid", *_free_spot(rng, radius, []), radius,
                            who if kind == "figure" else None)
    free = [c for c in BACKGROUND_COLOURS if c not in {thing.colour, *_character_colours(thing)}]
    return Scene(
        background=_pick(rng, BASE_BACKGROUNDS),
        background_colour=free[int(rng.integers(len(free)))],
        pattern=int(rng.integers(4)),
        objects=(thing,),
        texture_seed=int(rng.integers(2**31)),
    )


def _free_spot(rng: np.random.Generator, radius: float, placed: list[WorldObject]) -> tuple[float, float] | None:
    """A centre for a new object that keeps it inside the image and clear of the others (no occlusion, so
    every tag stays true), or None after a bounded number of tries."""
    for _ in range(60):
        x, y = (float(v) for v in rng.uniform(radius + 0.01, 1 - radius - 0.01, size=2))
        if all(np.hypot(x - o.x, y - o.y) > radius + o.radius + 0.03 for o in placed):
            return x, y
    return None


# ---------------------------------------------------------------------------------------------- rendering


def render_scene(scene: Scene, side: int) -> Image.Image:
    """Draw `scene` as an RGB image `side` pixels square."""
    if not MIN_SIDE <= side <= MAX_SIDE:
        raise ValueError(f"world image side must be within {MIN_SIDE}..{MAX_SIDE} pixels, got {side}")
    canvas = _background(scene, side)
    for thing in scene.objects:
        if thing.kind == "shape":
            _paint_shape(canvas, thing.name, thing.x * side, thing.y * side, thing.radius * side,
                         COLOURS[thing.colour], thing.texture)
        else:
            _paint_character(canvas, thing.character, thing.x * side, thing.y * side, thing.radius * side)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def _mixed(colour: tuple[int, int, int] | np.ndarray, towards: float, amount: float) -> np.ndarray:
    base = np.asarray(colour, dtype=np.float32)
    return base * (1 - amount) + towards * amount


def _background(scene: Scene, side: int) -> np.ndarray:
    main = np.asarray(COLOURS[scene.background_colour], dtype=np.float32)
    # The second colour of gradients and patterns: the same hue, lighter for dark colours, darker otherwise.
    toward = 255.0 if main.mean() < 110 else 0.0
    rows, cols = (np.mgrid[0:side, 0:side].astype(np.float32) + 0.5) / side
    if scene.background == "simple":
        return np.broadcast_to(main, (side, side, 3)).copy()
    if scene.background == "gradient":
        along = (rows, cols, (rows + cols) / 2, (rows + 1 - cols) / 2)[scene.pattern][..., None]
        return main * (1 - along) + _mixed(main, toward, 0.45) * along
    if scene.background == "noisy":
        # Noise in 32 x 32 cells, whatever the side, so it survives the resize to a tagger's input.
        rng = np.random.default_rng(scene.texture_seed)
        cells = rng.normal(0.0, 28.0, size=(32, 32, 3)).astype(np.float32)
        index = (np.arange(side) * 32) // side
        return main + cells[index][:, index]
    period = 1 / 8
    if scene.pattern % 2:
        on = ((np.floor(rows / period) + np.floor(cols / period)) % 2) == 1
    else:
        on = (np.floor((rows + cols) / period) % 2) == 1
    return np.where(on[..., None], _mixed(main, toward, 0.3), main)


def _mask(left: int, top: int, width: int, height: int, draw) -> np.ndarray:
    """Coverage (0..1) of what `draw(d, to_local)` draws in the pixel box (left, top, width, height); shapes
    are drawn SUPERSAMPLE times larger and box-filtered for anti-aliased edges."""
    big = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)

    def to_local(x: float, y: float) -> tuple[float, float]:
        return (x - left) * SUPERSAMPLE, (y - top) * SUPERSAMPLE

    draw(ImageDraw.Draw(big), to_local)
    return np.asarray(big.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The polygon of a shape centred at (cx, cy) with radius r, or None for the round ones."""
    if shape == "square":
        s = 0.75 * r  # corners within 1.06 r: clear of neighbours (placement keeps 0.03 of the side between)
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # equilateral, centroid at the centre
        return [(cx, cy - r), (cx + 0.866 * r, cy + 0.5 * r), (cx - 0.866 * r, cy + 0.5 * r)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + float(a) * float(np.cos(t)), cy + float(a) * float(np.sin(t))) for t, a in zip(angles, radii)]
    return None


def _draw_shape(shape: str, cx: float, cy: float, r: float):
    def draw(d: ImageDraw.ImageDraw, to_local) -> None:
        polygon = _outline(shape, cx, cy, r)
        if polygon is not None:
            d.polygon([to_local(x, y) for x, y in polygon], fill=255)
            return
        d.ellipse([*to_local(cx - r, cy - r), *to_local(cx + r, cy + r)], fill=255)
        if shape == "ring":
            hole = 0.55 * r
            d.ellipse([*to_local(cx - hole, cy - hole), *to_local(cx + hole, cy + hole)], fill=0)
        elif shape != "circle":
            raise ValueError(f"unknown world shape {shape!r}; known: {', '.join(SHAPES)}")

    return draw


def _box(canvas: np.ndarray, cx: float, cy: float, r: float) -> tuple[int, int, int, int]:
    side = canvas.shape[0]
    left, top = max(0, int(np.floor(cx - r)) - 1), max(0, int(np.floor(cy - r)) - 1)
    right, bottom = min(side, int(np.ceil(cx + r)) + 2), min(side, int(np.ceil(cy + r)) + 2)
    return left, top, right - left, bottom - top


def _composite(canvas: np.ndarray, box: tuple[int, int, int, int], alpha: np.ndarray, fill: np.ndarray) -> None:
    left, top, width, height = box
    region = canvas[top : top + height, left : left + width]
    region *= 1 - alpha[..., None]
    region += fill * alpha[..., None]


def _texture(texture: str, colour: tuple[int, int, int], box: tuple[int, int, int, int], cx: float, cy: float,
             r: float) -> np.ndarray:
    """The fill of a textured shape over `box`: the main colour at the centre, darker bands/dots/squares with
    a period relative to the radius (so the look does not depend on the side)."""
    left, top, width, height = box
    main = np.asarray(colour, dtype=np.float32)
    if texture == "solid":
        return np.broadcast_to(main, (height, width, 3))
    dy, dx = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = dx + left + 0.5 - cx, dy + top + 0.5 - cy
    period = max(1.5, r / 2.6)
    if texture == "striped":
        dark = np.floor(dy / period + 0.5) % 2 == 1
    elif texture == "checkered":
        dark = (np.floor(dx / period + 0.5) + np.floor(dy / period + 0.5)) % 2 == 1
    elif texture == "dotted":
        u, v = np.mod(dx, 2 * period) - period, np.mod(dy, 2 * period) - period
        dark = u * u + v * v < (0.6 * period) ** 2
    else:
        raise ValueError(f"unknown world texture {texture!r}; known: {', '.join(TEXTURES)}")
    return np.where(dark[..., None], main * TEXTURE_SHADE, main)


def _paint_shape(canvas: np.ndarray, shape: str, cx: float, cy: float, r: float, colour: tuple[int, int, int],
                 texture: str = "solid") -> None:
    box = _box(canvas, cx, cy, r)
    alpha = _mask(*box, _draw_shape(shape, cx, cy, r))
    _composite(canvas, box, alpha, _texture(texture, colour, box, cx, cy, r))


def _paint_polygon(canvas: np.ndarray, points: list[tuple[float, float]], colour: tuple[int, int, int]) -> None:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    r = max(max(xs) - min(xs), max(ys) - min(ys)) / 2 + 1
    box = _box(canvas, cx, cy, r)

    def draw(d: ImageDraw.ImageDraw, to_local) -> None:
        d.polygon([to_local(x, y) for x, y in points], fill=255)

    alpha = _mask(*box, draw)
    _composite(canvas, box, alpha, np.asarray(colour, dtype=np.float32))


def character_layout(who: Character, cx: float, cy: float, r: float) -> dict[str, tuple[float, float, float]]:
    """Where a character's parts go, as (x, y, radius) in the same units as its centre and radius r."""
    return {
        "body": (cx, cy + 0.38 * r, 0.58 * r),
        "head": (cx, cy - 0.38 * r, 0.4 * r),
    }


def _paint_character(canvas: np.ndarray, who: Character, cx: float, cy: float, r: float) -> None:
    parts = character_layout(who, cx, cy, r)
    bx, by, br = parts["body"]
    hx, hy, hr = parts["head"]
    _paint_shape(canvas, who.body, bx, by, br, COLOURS[who.body_colour])
    _paint_shape(canvas, who.head, hx, hy, hr, COLOURS[who.head_colour])
    for side in (-1, 1):
        _paint_shape(canvas, "circle", hx + side * 0.38 * hr, hy + 0.05 * hr, 0.15 * hr, COLOURS["black"])
    accent = COLOURS[who.accessory_colour]
    if who.accessory == "hat":
        _paint_polygon(canvas, [(hx - 0.8 * hr, hy - 0.7 * hr), (hx + 0.8 * hr, hy - 0.7 * hr),
                                (hx + 0.1 * hr, hy - 1.55 * hr)], accent)
    elif who.accessory == "bow":
        for side in (-1, 1):
            _paint_polygon(canvas, [(hx + side * 0.15 * hr, hy - 0.95 * hr), (hx + side * 0.95 * hr, hy - 1.4 * hr),
                                    (hx + side * 0.95 * hr, hy - 0.5 * hr)], accent)
    elif who.accessory == "antenna":
        _paint_polygon(canvas, [(hx - 0.06 * hr, hy - 0.9 * hr), (hx + 0.06 * hr, hy - 0.9 * hr),
                                (hx + 0.06 * hr, hy - 1.3 * hr), (hx - 0.06 * hr, hy - 1.3 * hr)], accent)
        _paint_shape(canvas, "circle", hx, hy - 1.35 * hr, 0.2 * hr, accent)  # top at the character's radius
    else:
        raise ValueError(f"unknown accessory {who.accessory!r} of {who.name}")


# ------------------------------------------------------------------------------------------------- access


def world_image(
    seed: int,
    index: int,
    *,
    side: int = 64,
    characters: Sequence[str] = BASE_CHARACTERS,
    character_probability: float = 0.35,
) -> WorldImage:
    """Image `index` of world `seed`: the same bytes for the same arguments, whatever else was drawn."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, characters=characters, character_probability=character_probability)
    return WorldImage(seed, index, scene, render_scene(scene, side))


def world_images(
    seed: int,
    count: int,
    *,
    start: int = 0,
    side: int | tuple[int, int] = 64,
    characters: Sequence[str] = BASE_CHARACTERS,
    character_probability: float = 0.35,
) -> Iterator[WorldImage]:
    """Images start..start+count-1 of world `seed`. `side` may be a (low, high) range: each image then picks
    its side from its own generator, so mixed-size sets are as reproducible as fixed-size ones."""
    for index in range(start, start + count):
        if isinstance(side, tuple):
            side_of = int(np.random.default_rng([seed, index, 1]).integers(side[0], side[1] + 1))
        else:
            side_of = side
        yield world_image(seed, index, side=side_of, characters=characters,
                          character_probability=character_probability)


def base_world_images(seed: int, count: int, *, side: int = 64, characters: Sequence[str] = BASE_CHARACTERS,
                      kinds: dict[str, float] = BASE_OBJECT_KINDS) -> Iterator[WorldImage]:
    """Images 0..count-1 of world `seed` drawn by `sample_base_scene` (the demo base model's training set)."""
    for index in range(count):
        scene = sample_base_scene(np.random.default_rng([seed, index]), characters=characters, kinds=kinds)
        yield WorldImage(seed, index, scene, render_scene(scene, side))


def concept_images(seed: int, count: int, *, side: int = 96, concept: str = DEMO_CONCEPT) -> Iterator[WorldImage]:
    """Images that all show `concept` alone, in the base model's kind of scene (the demo dataset: one new
    character the base model learns as an embedding)."""
    return base_world_images(seed, count, side=side, characters=(concept,), kinds={"character": 1.0})


# ---------------------------------------------------------------------------------------------- datasets

CAPTION_OPTIONS = CaptionOptions.for_backend("wd14")  # the caption stage's own spelling of tags


def caption_of(tags: Iterable[str], *, exclude: Iterable[str] = ()) -> str:
    """The caption of a tag list, spelled as the pipeline's caption stage spells tags (spaces for underscores,
    escaped brackets), without the rating and without `exclude`d tags."""
    excluded = set(exclude) | {RATING_TAG}
    return CAPTION_OPTIONS.separator.join(format_tag(tag, CAPTION_OPTIONS) for tag in tags if tag not in excluded)


def write_captioned_dataset(
    out_dir: Path,
    images: Iterable[WorldImage],
    *,
    exclude_tags: Iterable[str] = (),
    prefix: str = "world",
    dataset_yaml: str | None = None,
) -> Path:
    """Write each image as `<prefix>_<seed>_<index>.png` with a `.txt` sidecar holding its true tags as a
    caption (minus `exclude_tags`), plus `dataset.yaml` when given, into the new folder `out_dir`.

    The folder is staged beside its target and renamed into place, so a reader never sees half a dataset; an
    existing `out_dir` is refused (it may hold someone's images).
    """
    excluded = tuple(exclude_tags)
    with staged_folder(Path(out_dir), "captioned world dataset") as staging:
        staging.mkdir()
        written = 0
        for item in images:
            stem = f"{prefix}_{item.seed}_{item.index:05d}"
            item.image.save(staging / f"{stem}.png", format="PNG")
            write_text(staging / f"{stem}.txt", caption_of(item.tags, exclude=excluded) + "\n")
            written += 1
        if not written:
            raise ValueError(f"no images selected for the world dataset {out_dir}")
        if dataset_yaml is not None:
            write_text(staging / "dataset.yaml", dataset_yaml)
    return Path(out_dir)
