"""A synthetic captioning set drawn with Pillow: the default data of ``jaxseq caption train`` (no download).

Each image is a light, slightly noisy background with one shape (circle, square, triangle) of one colour
(red, green, blue, yellow, purple), small or large, in one cell of a 3 x 3 grid (top/middle/bottom x
left/centre/right), jittered inside the cell. Every image has five captions in five different wordings, e.g.::

    a large red circle at the top left
    there is a large red circle in the top left
    top left a large circle coloured red
    the red shape in the top left is a large circle
    a red circle that is large top left

Train and test images are separate random draws (held-out images, a different seed stream).

Image features are the pixels themselves, box-downsampled to ``FEATURE_SIZE`` squared, minus the image's
median colour (the background, which varies from image to image), so the set needs no pretrained encoder
(``features``: flattened, for merge/inject; ``grid_features``: ``[cells, patch pixels]``, for attention).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48    # drawing resolution: each grid cell is 16 px, enough to tell a triangle from a circle
FEATURE_SIZE = 32  # pixels per side fed to the model (3,072 features); a small shape keeps ~6 px across
GRID = 4           # attention grid: 4 x 4 patches of 8 x 8 pixels

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 50, 170)}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
SIZES = {"small": 0.6, "large": 0.95}  # fraction of a grid cell

TEMPLATES = (
    "a {size} {colour} {shape} at the {row} {column}",
    "there is a {size} {colour} {shape} in the {row} {column}",
    "{row} {column} a {size} {shape} coloured {colour}",
    "the {colour} shape in the {row} {column} is a {size} {shape}",
    "a {colour} {shape} that is {size} {row} {column}",
)


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    row: str
    column: str

    def captions(self) -> list[str]:
        return [t.format(**dataclasses.asdict(self)) for t in TEMPLATES]


def draw(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` as an RGB ``IMAGE_SIZE`` square with position jitter and pixel noise."""
    cell = IMAGE_SIZE / 3
    side = SIZES[scene.size] * cell
    slack = cell - side
    x0 = COLUMNS.index(scene.column) * cell + rng.uniform(0, slack)
    y0 = ROWS.index(scene.row) * cell + rng.uniform(0, slack)
    box = [x0, y0, x0 + side, y0 + side]
    background = tuple(int(v) for v in rng.integers(200, 250, size=3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    pen = ImageDraw.Draw(image)
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        pen.ellipse(box, fill=colour)
    elif scene.shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    pixels = np.asarray(image, np.int16) + rng.integers(-8, 9, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def features(image: Image.Image) -> np.ndarray:
    """``float32[FEATURE_SIZE**2 * 3]`` in [-2, 2]: the image box-downsampled, minus its median colour (the
    background; the shape covers at most a tenth of the image), flattened."""
    small = np.asarray(image.convert("RGB").resize((FEATURE_SIZE, FEATURE_SIZE), Image.Resampling.BOX), np.float32)
    return ((small - np.median(small, axis=(0, 1))) / 127.5).reshape(-1)


def grid_features(flat: np.ndarray) -> np.ndarray:
    """``[..., FEATURE_SIZE**2 * 3]`` -> ``[..., GRID * GRID, patch * patch * 3]`` (attention positions)."""
    patch = FEATURE_SIZE // GRID
    x = flat.reshape(*flat.shape[:-1], GRID, patch, GRID, patch, 3)
    x = np.moveaxis(x, -4, -3)  # [..., gy, gx, py, px, 3]
    return x.reshape(*flat.shape[:-1], GRID * GRID, patch * patch * 3)


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                 list(SIZES)[rng.integers(len(SIZES))], ROWS[rng.integers(3)], COLUMNS[rng.integers(3)])


@dataclasses.dataclass
class SyntheticCaptions:
    """``ids`` (names), ``images`` (PIL), ``features`` ``float32[N, D]``, ``captions`` (5 each), ``scenes``."""

    ids: list
    images: list
    features: np.ndarray
    captions: list
    scenes: list


def make(num_images: int, *, seed: int, split: str = "train") -> SyntheticCaptions:
    """Draw ``num_images`` scenes; ``split`` selects an independent random stream (held-out images)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    stream = {"train": 0, "dev": 1, "test": 2}
    if split not in stream:
        raise ValueError(f"split must be one of {sorted(stream)}, got {split!r}")
    rng = np.random.default_rng([seed, stream[split]])
    scenes = [random_scene(rng) for _ in range(num_images)]
    images = [draw(s, rng) for s in scenes]
    return SyntheticCaptions([f"{split}_{i:05d}" for i in range(num_images)], images,
                             np.stack([features(im) for im in images]), [s.captions() for s in scenes], scenes)


def attribute_accuracy(captions, scenes) -> dict[str, float]:
    """Fraction of generated captions that name each attribute of their scene correctly (and no other value).

    A sharper check than BLEU that the model reads the image: a caption that says "red" for a blue square
    loses one word of BLEU but scores 0 on ``colour`` here. ``all`` requires all five attributes right.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions for {len(scenes)} scenes")
    values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "row": ROWS, "column": COLUMNS}
    right = {name: 0 for name in values}
    every = 0
    for caption, scene in zip(captions, scenes):
        words = set(caption.split())
        ok = {name: words & set(options) == {getattr(scene, name)} for name, options in values.items()}
        for name in values:
            right[name] += ok[name]
        every += all(ok.values())
    n = max(len(scenes), 1)
    return {**{name: right[name] / n for name in values}, "all": every / n}
