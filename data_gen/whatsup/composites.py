"""What'sUp composites (docs/experiments.md, "What'sUp composites"; paper section 3.1): two What'sUp Controlled
photographs that share their reference object, one object left of it and a different one right of it, merged
into one image of three objects in a row at the model's native resolution.

Construction: both photos are resized to grid.width x grid.height (stretched, so no object beside the
reference is cropped away) and cut into three full-height parts at `cuts`, snapped to whole visual tokens.
The composite is the left photo's left and middle parts (its object, then the shared reference) with the
right photo's right part (its object). Items: 0 = left object, 1 = reference, 2 = right object. An item's
strip is its part.

One set: the composites are drawn from every pair of photos with the run's seed alone (`n_composites`, default
the paper's 1074), before any box is read, so every What'sUp experiment (Table 1, Table 3, the probes, the
patching panels) reads the same composites and the same splits. With a box file, items carry their boxes
(data_gen.whatsup.boxes); a composite whose boxes cannot be placed carries none and says why (`box_issue`);
an experiment that needs boxes keeps `with_boxes(composites)` and records how many it dropped.
"""

from dataclasses import dataclass, replace

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from common.errors import UsageError, check_choice
from common.geometry import Grid, PixelBox, TokenBox
from data_gen.render import Item, Sample
from data_gen.settings import TARGET_POSITION, Setting
from data_gen.whatsup.boxes import NOT_FOUND, OUTSIDE, covering_token_box, place_boxes, read_boxes_for
from data_gen.whatsup.photos import Photo, read_photos, whatsup_root

DIRECTIONS = ("left", "right")


@dataclass
class Composite:
    """Two photos merged into one (module docstring). `items`: left object, reference, right object, with
    pixel and token boxes on `grid` (None without a box file, or when `box_issue` says why they cannot be
    placed: "not found" or "outside"); `strips`: their parts; `columns`: the part boundaries in token columns
    (0, c1, c2, cols). The image is drawn on demand by `image()`: 1074 Gemma-size images would take 2.6 GB."""

    id: str
    left: Photo
    right: Photo
    grid: Grid
    columns: tuple[int, int, int, int]
    items: list[Item]
    strips: list[TokenBox]
    box_issue: str | None = None

    @property
    def has_boxes(self) -> bool:
        return all(item.token_box is not None for item in self.items)

    def image(self) -> Image.Image:
        """grid.width x grid.height RGB: the left photo with its right part replaced by the right photo's."""
        image, right = (_fitted(photo.path, self.grid) for photo in (self.left, self.right))
        x = self.columns[2] * self.grid.pixels_per_token
        image.paste(right.crop((x, 0, self.grid.width, self.grid.height)), (x, 0))
        return image


def _fitted(path, grid: Grid) -> Image.Image:
    with Image.open(path) as photo:
        return photo.convert("RGB").resize((grid.width, grid.height), Image.Resampling.BICUBIC)


def part_columns(grid: Grid, cuts) -> tuple[int, int, int, int]:
    """Token columns (0, c1, c2, cols) bounding the left, middle and right parts: `cuts` are two fractions of
    the width, rounded to whole tokens. Qwen2-VL (12 columns) with thirds: (0, 4, 8, 12)."""
    cuts = list(cuts)
    if len(cuts) != 2:
        raise UsageError(f"setting.cuts needs two fractions of the width, got {cuts}")
    c1, c2 = (round(float(f) * grid.cols) for f in cuts)
    if not 0 < c1 < c2 < grid.cols:
        raise UsageError(f"setting.cuts {cuts} give part columns [0, {c1}), [{c1}, {c2}), [{c2}, {grid.cols}): "
                         f"each part needs at least one of the grid's {grid.cols} token columns")
    return 0, c1, c2, grid.cols


def pair_photos(photos: list[Photo]) -> list[tuple[Photo, Photo]]:
    """Every (left photo, right photo) with the same reference and different objects, sorted by reference,
    left object, right object."""
    lefts = [p for p in photos if p.side == "left"]
    rights = [p for p in photos if p.side == "right"]
    pairs = [(a, b) for a in lefts for b in rights if a.reference == b.reference and a.object != b.object]
    return sorted(pairs, key=lambda pair: (pair[0].reference, pair[0].object, pair[1].object,
                                           pair[0].path.name, pair[1].path.name))


def draw(pairs: list, n, seed: int) -> list:
    """`n` of `pairs` drawn uniformly without replacement with `seed`, in their original order (all if n is
    None or not smaller)."""
    if n is None:
        return pairs
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"setting.n_composites must be a positive integer or null, got {n!r}")
    if n >= len(pairs):
        return pairs
    keep = np.random.default_rng([seed, 0]).choice(len(pairs), size=n, replace=False)
    return [pairs[i] for i in sorted(keep.tolist())]


@dataclass
class WhatsUp:
    """A What'sUp directory read for one model grid: every left/right photo by (object, side, reference), their
    boxes placed on the grid (`placed`: a list per photo, or NOT_FOUND / OUTSIDE), and the composites drawn
    with the seed."""

    setting: Setting
    grid: Grid
    columns: tuple[int, int, int, int]
    photos: dict[tuple[str, str, str], Photo]
    placed: dict[Photo, list[PixelBox | None] | str]
    composites: list[Composite]

    def composite(self, left: Photo, right: Photo) -> Composite:
        """The composite of a left photo and a right photo with the same reference."""
        specs = [self.setting.item(name) for name in (left.object, left.reference, right.object)]
        found = [self.placed[left], self.placed[right]]
        issue = next((f for f in found if isinstance(f, str)), None)
        boxes = [None, None, None] if issue else found[0] + found[1]
        items = [Item(spec.name, spec.answer, k, box, None if box is None else covering_token_box(self.grid, box))
                 for k, (spec, box) in enumerate(zip(specs, boxes, strict=True))]
        strips = [(0, self.columns[k], self.grid.rows, self.columns[k + 1]) for k in range(3)]
        composite_id = "_".join(spec.name.replace(" ", "-") for spec in specs)
        return Composite(composite_id, left, right, self.grid, tuple(self.columns), items, strips, issue)

    def mirror(self, composite: Composite) -> Composite | None:
        """The data mirror of `composite` (X left of the reference, Y right of it): the composite of the dataset's
        own photos of Y left of and X right of the same reference (same objects, order swapped; paper section
        5.2.2's design rule). None when the directory lacks either photo."""
        left = self.photos.get((composite.right.object, "left", composite.left.reference))
        right = self.photos.get((composite.left.object, "right", composite.left.reference))
        return None if left is None or right is None else self.composite(left, right)


def load_whatsup(cfg: DictConfig) -> WhatsUp:
    """The What'sUp directory `cfg.data.whatsup_dir` on `cfg.model`'s grid with `cfg.setting` (whatsup.yaml): its
    photos, their boxes from `cfg.data.whatsup_boxes` (when given), and the composites: all pairs, or
    `n_composites` of them drawn with `cfg.seed` alone, in pair order."""
    setting = Setting.from_config(cfg.setting)
    grid = Grid.from_config(cfg.model.grid)
    columns = part_columns(grid, cfg.setting.cuts)
    subset = str(cfg.setting.subset)
    root = whatsup_root(cfg.data.whatsup_dir, subset)
    photos = read_photos(root, subset)
    unknown = sorted({name for p in photos for name in (p.object, p.reference)} - set(setting.item_names))
    if unknown:
        raise UsageError(f"What'sUp names {', '.join(unknown)} are not items of setting {setting.name!r}: add them "
                         f"to configs/setting/{setting.name}.yaml")
    boxes = None
    if cfg.data.get("whatsup_boxes") not in (None, ""):
        boxes = read_boxes_for(cfg.data.whatsup_boxes, photos, root)
    placed = {photo: place_boxes(photo, grid, columns, boxes) for photo in photos}
    data = WhatsUp(setting, grid, columns, {p.key: p for p in photos}, placed, [])
    data.composites = [data.composite(a, b) for a, b in draw(pair_photos(photos), cfg.setting.get("n_composites"),
                                                              cfg.seed)]
    return data


def load_composites(cfg: DictConfig) -> list[Composite]:
    """The composites of `load_whatsup(cfg)`: drawn from the seed alone, with boxes where they can be placed."""
    return load_whatsup(cfg).composites


def with_boxes(composites: list[Composite]) -> tuple[list[Composite], dict]:
    """The composites whose three items have boxes, and what was dropped: {"n", "with_boxes",
    "dropped_box_not_found" (a needed box is null in the box file), "dropped_box_outside" (a box falls outside
    its part at these cuts)}."""
    kept = [c for c in composites if c.has_boxes]
    issues = [c.box_issue for c in composites if not c.has_boxes]
    return kept, {"n": len(composites), "with_boxes": len(kept), "dropped_box_not_found": issues.count(NOT_FOUND),
                  "dropped_box_outside": issues.count(OUTSIDE)}


def composite_samples(composite: Composite, setting: Setting, directions=DIRECTIONS) -> list[Sample]:
    """One horizontal Sample per queried direction (left: the answer is item 0, right: item 2), prompted with
    `setting`'s template about the reference; the samples share one freshly drawn image."""
    image = composite.image()
    samples = []
    for direction in directions:
        check_choice("direction of a What'sUp composite", direction, DIRECTIONS)
        samples.append(Sample(
            id=f"{setting.name}_{composite.id}_{direction}", setting=setting.name, orientation="horizontal",
            items=[replace(item) for item in composite.items], strips=list(composite.strips),
            direction=direction, prompt=setting.prompt(direction, composite.items[1].name),
            answer=composite.items[TARGET_POSITION[direction]].answer, image=image))
    return samples
