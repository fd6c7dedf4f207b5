"""What'sUp composites (docs/experiments.md, "What'sUp composites"; paper section 3.1): two What'sUp Controlled photographs that share their
reference object, one object left of it and a different one right of it, merged into one image of three
objects in a row at the model's native resolution.

Layout read under `data.whatsup_dir` (as published with github.com/amitakamath/whatsup_vlms, see its
`dataset_zoo/aro_datasets.py`, and in the Hugging Face dataset AdaptVis/all_datasets):

    controlled_images_dataset.json   [{"image_path": "data/controlled_images/beer-bottle_left_of_armchair.jpeg",
                                       "caption_options": ["A beer bottle to the left of a armchair", ...]}, ...]
    controlled_images/<object>_<relation>_<reference>.jpeg

The first caption is the true one. Relations: left_of, right_of, on, under (subset `controlled_clevr`,
What'sUp Controlled-B: left_of, right_of, in-front_of, behind); hyphens stand for spaces in names. Only the
left_of and right_of photos are used, found by file name in `<subset>/`.

Construction: both photos are resized to grid.width x grid.height (stretched, so no object beside the
reference is cropped away) and cut into three full-height parts at `cuts`, snapped to whole visual tokens.
The composite is the left photo's left and middle parts (its object, then the shared reference) with the
right photo's right part (its object). Items: 0 = left object, 1 = reference, 2 = right object.

Boxes (paper Fig 33: a probe trains on the tokens inside each object's box). `data.whatsup_boxes` is a JSON
file with one entry per left/right photo, in the photo's own pixels (exclusive ends),

    {"beer-bottle_left_of_armchair.jpeg": {"object": [x0, y0, x1, y1], "reference": [x0, y0, x1, y1]}, ...}

made by an open-vocabulary detector (the `boxes` command, data_gen/whatsup/detect.py) or by hand. A box may be null: the
detector found no such object above its threshold. An entry may hold more keys (the detector adds `scores`);
they are ignored. Boxes are scaled to the composite and clipped to the item's part; a photo whose needed box
(object and reference of a left photo, object of a right one) is null or keeps less than half its area inside
its part is left out (with a warning). An item's token box covers every token its pixel box overlaps.
Without a box file the composites carry no boxes (items' pixel_box and token_box are None): accuracy and
strip patching need none, and whatever trains on item tokens (whatsup_probes, amplification) calls
`require_boxes` first and stops there. An item's strip is its part, with or without boxes.

Count: Controlled-A photographs 103 object-reference combinations (31 with the armchair, 45 with the chair,
27 with the table), each with the object left, right, on and under. Ordered pairs (a left of r, b right of
r, a != b) give 31*30 + 45*44 + 27*26 = 3612 composites. The paper reports 1074 without saying how it chose
them, so `n_composites` (default 1074) draws that many uniformly from all pairs with the run's seed.

Stand-in data for tests and CPU demos, in the same layout (a noisy grey photo, the reference as one colored
block in the middle and the object as another block on its side), with DIR/boxes.json holding the blocks'
known boxes (STAND_IN_OBJECT_BOX, STAND_IN_REFERENCE_BOX): stand-in ground truth, not a detector's output.

Command line (Hydra overrides of configs/whatsup_data.yaml after the subcommand, as every command here):

    python -m data_gen.whatsup stand_in data.whatsup_dir=DIR [seed=0]     (or: stand_in DIR)
    python -m data_gen.whatsup boxes data.whatsup_dir=DIR [data.whatsup_boxes=FILE] [detector.threshold=0.1 ...]

`boxes` runs the detector of `detector:` (OWLv2 by default) on every left_of/right_of photo and writes the box
file to data.whatsup_boxes (default DIR/boxes.json); then pass data.whatsup_boxes=FILE to the experiments.
"""

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from common.errors import UsageError, check_choice
from common.geometry import Grid, PixelBox, TokenBox
from data_gen.pairs import LastTokenPair, MirrorPair
from data_gen.render import Item, Sample
from data_gen.settings import TARGET_POSITION, Setting

SUBSETS = {"controlled_images": "controlled_images_dataset.json", "controlled_clevr": "controlled_clevr_dataset.json"}
SIDE_OF_RELATION = {"left_of": "left", "right_of": "right"}
CAPTION_WORDS = {"left": "left of", "right": "right of"}
DIRECTIONS = ("left", "right")
MIN_KEPT_AREA = 0.5     # a tight box must keep this much of its area inside its part
BOX_KEYS = ("object", "reference")
BOXES_FILE = "boxes.json"   # default box file under data.whatsup_dir (the `boxes` and `stand_in` commands)


def _get_data(subset: str) -> str:
    return (f"download What'sUp (the Google Drive folder linked from github.com/amitakamath/whatsup_vlms, or the "
            f"Hugging Face dataset AdaptVis/all_datasets) and set data.whatsup_dir to the directory holding "
            f"{SUBSETS[subset]} and {subset}/")


@dataclass(frozen=True)
class Photo:
    """One What'sUp photograph: `object` placed `side` (left or right) of `reference`; names with spaces."""

    path: Path
    object: str
    side: str
    reference: str


@dataclass
class Composite:
    """Two photos merged into one (module docstring). `items`: left object, reference, right object, with
    pixel and token boxes on `grid` (None when no box file was given); `strips`: their parts; `columns`: the
    part boundaries in token columns (0, c1, c2, cols). The image is drawn on demand by `image()`: 1074
    Gemma-size images would take 2.6 GB."""

    id: str
    left: Photo
    right: Photo
    grid: Grid
    columns: tuple[int, int, int, int]
    items: list[Item]
    strips: list[TokenBox]

    def image(self) -> Image.Image:
        """grid.width x grid.height RGB: the left photo with its right part replaced by the right photo's."""
        image, right = (_fitted(photo.path, self.grid) for photo in (self.left, self.right))
        x = self.columns[2] * self.grid.pixels_per_token
        image.paste(right.crop((x, 0, self.grid.width, self.grid.height)), (x, 0))
        return image


def _fitted(path: Path, grid: Grid) -> Image.Image:
    with Image.open(path) as photo:
        return photo.convert("RGB").resize((grid.width, grid.height), Image.Resampling.BICUBIC)


# --- reading ---------------------------------------------------------------------------------------------

def whatsup_root(path, subset: str = "controlled_images") -> Path:
    """`data.whatsup_dir` as a directory; UsageError naming the path and how to get the data otherwise."""
    check_choice("What'sUp subset", subset, SUBSETS)
    if path in (None, ""):
        raise UsageError(f"data.whatsup_dir is not set: {_get_data(subset)}")
    root = Path(str(path)).expanduser()
    if not root.is_dir():
        raise UsageError(f"data.whatsup_dir={root} does not exist: {_get_data(subset)}")
    return root


def read_photos(root: Path, subset: str = "controlled_images") -> list[Photo]:
    """The left_of and right_of photos of a What'sUp subset under `root`, in annotation order. UsageError when
    the annotation file or a photo is missing, or a file name contradicts its true caption."""
    check_choice("What'sUp subset", subset, SUBSETS)
    annotation = Path(root) / SUBSETS[subset]
    if not annotation.is_file():
        raise UsageError(f"{annotation} does not exist: {_get_data(subset)}")
    photos = []
    for k, entry in enumerate(json.loads(annotation.read_text())):
        try:
            name, caption = Path(entry["image_path"]).name, str(entry["caption_options"][0])
        except (KeyError, IndexError, TypeError) as err:
            raise UsageError(f"{annotation}: entry {k} lacks image_path or caption_options") from err
        parts = Path(name).stem.split("_")      # <object>_<relation, maybe with _>_<reference>
        side = SIDE_OF_RELATION.get("_".join(parts[1:-1]))
        if side is None:
            continue
        if CAPTION_WORDS[side] not in caption:
            raise UsageError(f"{annotation}: {name} is named {side} of but its true caption says {caption!r}")
        path = Path(root) / subset / name
        if not path.is_file():
            raise UsageError(f"{path} is missing (listed in {annotation.name})")
        photos.append(Photo(path, parts[0].replace("-", " "), side, parts[-1].replace("-", " ")))
    return photos


def make_boxes_hint(whatsup_dir=None) -> str:
    """How to make a box file, for error messages."""
    where = whatsup_dir if whatsup_dir not in (None, "") else "DIR"
    return (f"make them with `python -m data_gen.whatsup boxes data.whatsup_dir={where}` (an open-vocabulary "
            f"detector), then pass data.whatsup_boxes=FILE")


def require_boxes(cfg: DictConfig, what: str) -> Path:
    """The box file `cfg.data.whatsup_boxes`; a one-line UsageError saying how to make one when it is not set
    or missing. Called by every run that trains on the tokens inside the items' boxes (`what` names it):
    without a box file the composites carry no boxes (module docstring)."""
    value = cfg.data.get("whatsup_boxes")
    if value in (None, ""):
        raise UsageError(f"{what} trains on the tokens inside each object's box (paper Fig 33) but "
                         f"data.whatsup_boxes is not set: {make_boxes_hint(cfg.data.get('whatsup_dir'))}")
    file = Path(str(value)).expanduser()
    if not file.is_file():
        raise UsageError(f"data.whatsup_boxes={file} does not exist: {make_boxes_hint(cfg.data.get('whatsup_dir'))}")
    return file


def load_box_entries(file: Path) -> dict:
    """The raw JSON object of a box file; UsageError when it is not one."""
    try:
        entries = json.loads(Path(file).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{file} is not a readable JSON box file: {err}") from err
    if not isinstance(entries, dict):
        raise UsageError(f"{file} must hold a JSON object {{photo file name: {{object: box, reference: box}}}}")
    return entries


def read_boxes(path) -> dict[str, dict[str, PixelBox | None]]:
    """The box file (module docstring): {photo file name: {"object": box or None, "reference": box or None}}."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise UsageError(f"data.whatsup_boxes={file} does not exist; {make_boxes_hint()}")
    boxes = {}
    for name, entry in load_box_entries(file).items():
        try:
            found = {key: None if entry[key] is None else tuple(int(v) for v in entry[key]) for key in BOX_KEYS}
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"{file}: {name} needs object and reference boxes [x0, y0, x1, y1] (or null)") from err
        for key, box in found.items():
            if box is not None and (len(box) != 4 or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3])):
                raise UsageError(f"{file}: {name} has an empty or malformed {key} box {list(box)}")
        boxes[name] = found
    return boxes


def write_boxes(file, entries: dict) -> None:
    """Write a box file atomically (a temporary file beside it renamed into place), entries sorted by name."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(sorted(entries.items())), indent=1) + "\n")
    os.replace(tmp, file)


# --- geometry --------------------------------------------------------------------------------------------

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


def covering_token_box(grid: Grid, box: PixelBox) -> TokenBox:
    """(row0, col0, row1, col1) of every token that pixel box (x0, y0, x1, y1) overlaps."""
    x0, y0, x1, y1 = box
    p = grid.pixels_per_token
    return (y0 // p, x0 // p, -(-y1 // p), -(-x1 // p))


def _area(box: PixelBox) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def _photo_boxes(photo: Photo, grid: Grid, columns, boxes) -> list[PixelBox | None] | str:
    """The photo's item boxes on the composite: [object, reference] for a left photo, [object] for a right
    one. None for each without a box file; else its scaled boxes clipped to their parts, or why the photo is
    left out ("not found": a needed box is null, "outside": one keeps less than MIN_KEPT_AREA of its area)."""
    p = grid.pixels_per_token
    parts = [(columns[k] * p, 0, columns[k + 1] * p, grid.height) for k in range(3)]
    wanted = [("object", parts[0]), ("reference", parts[1])] if photo.side == "left" else [("object", parts[2])]
    if boxes is None:
        return [None for _ in wanted]
    if any(boxes[photo.path.name][key] is None for key, _ in wanted):
        return "not found"
    with Image.open(photo.path) as image:
        width, height = image.size
    placed = []
    for key, part in wanted:
        x0, y0, x1, y1 = boxes[photo.path.name][key]
        scaled = (x0 * grid.width // width, y0 * grid.height // height,
                  -(-x1 * grid.width // width), -(-y1 * grid.height // height))
        clipped = (max(scaled[0], part[0]), max(scaled[1], part[1]), min(scaled[2], part[2]), min(scaled[3], part[3]))
        if _area(clipped) < MIN_KEPT_AREA * _area(scaled):
            return "outside"
        placed.append(clipped)
    return placed


# --- composites ------------------------------------------------------------------------------------------

def pair_photos(photos: list[Photo]) -> list[tuple[Photo, Photo]]:
    """Every (left photo, right photo) with the same reference and different objects, sorted by reference,
    left object, right object."""
    lefts = [p for p in photos if p.side == "left"]
    rights = [p for p in photos if p.side == "right"]
    pairs = [(a, b) for a in lefts for b in rights if a.reference == b.reference and a.object != b.object]
    return sorted(pairs, key=lambda pair: (pair[0].reference, pair[0].object, pair[1].object,
                                           pair[0].path.name, pair[1].path.name))


def load_composites(cfg: DictConfig) -> list[Composite]:
    """The composites of `cfg.data.whatsup_dir` on `cfg.model`'s grid, with `cfg.setting` (whatsup.yaml): all
    pairs, or `n_composites` of them drawn with `cfg.seed`, in pair order. Item boxes from
    `cfg.data.whatsup_boxes`, or None without one (module docstring)."""
    setting = Setting.from_config(cfg.setting)
    grid = Grid.from_config(cfg.model.grid)
    columns = part_columns(grid, cfg.setting.cuts)
    subset = str(cfg.setting.subset)
    photos = read_photos(whatsup_root(cfg.data.whatsup_dir, subset), subset)
    unknown = sorted({name for p in photos for name in (p.object, p.reference)} - set(setting.item_names))
    if unknown:
        raise UsageError(f"What'sUp names {', '.join(unknown)} are not items of setting {setting.name!r}: add them "
                         f"to configs/setting/{setting.name}.yaml")
    boxes = None
    if cfg.data.get("whatsup_boxes") not in (None, ""):
        boxes = read_boxes(cfg.data.whatsup_boxes)
        missing = [p.path.name for p in photos if p.path.name not in boxes]
        if missing:
            raise UsageError(f"data.whatsup_boxes lacks {len(missing)} of the {len(photos)} left/right photos, "
                             f"e.g. {missing[0]}")
    placed = {photo: _photo_boxes(photo, grid, columns, boxes) for photo in photos}
    why = {"not found": f"a needed box is null (not found by the detector) in {cfg.data.get('whatsup_boxes')}",
           "outside": f"their boxes fall outside their part at cuts {list(cfg.setting.cuts)}"}
    for reason, says in why.items():
        dropped = sorted(photo.path.name for photo, found in placed.items() if found == reason)
        if dropped:
            warnings.warn(f"{len(dropped)} What'sUp photos left out, {says}: {', '.join(dropped[:5])}"
                          f"{', ...' if len(dropped) > 5 else ''}", stacklevel=2)
    pairs = [(a, b) for a, b in pair_photos(photos) if not isinstance(placed[a], str) and not isinstance(placed[b], str)]
    pairs = _draw(pairs, cfg.setting.get("n_composites"), cfg.seed)
    return [_composite(a, b, setting, grid, columns, placed[a] + placed[b]) for a, b in pairs]


def _draw(pairs: list, n, seed: int) -> list:
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


def _composite(left: Photo, right: Photo, setting: Setting, grid: Grid, columns, boxes) -> Composite:
    specs = [setting.item(name) for name in (left.object, left.reference, right.object)]
    items = [Item(spec.name, spec.answer, k, box, None if box is None else covering_token_box(grid, box))
             for k, (spec, box) in enumerate(zip(specs, boxes, strict=True))]
    strips = [(0, columns[k], grid.rows, columns[k + 1]) for k in range(3)]
    composite_id = "_".join(spec.name.replace(" ", "-") for spec in specs)
    return Composite(composite_id, left, right, grid, tuple(columns), items, strips)


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


def mirrored_sample(sample: Sample, grid: Grid, id: str) -> Sample:
    """`sample` flipped left to right: each object keeps its identity, the order swaps (item 0 becomes item 2),
    boxes and strips are mirrored, the query stays and so the answer is the other object."""
    def flip(box, width):
        return None if box is None else (width - box[2], box[1], width - box[0], box[3])

    def flip_token(box):
        return None if box is None else (box[0], grid.cols - box[3], box[2], grid.cols - box[1])

    items = [replace(item, position=2 - item.position, pixel_box=flip(item.pixel_box, grid.width),
                     token_box=flip_token(item.token_box)) for item in reversed(sample.items)]
    answer = items[TARGET_POSITION[sample.direction]].answer if sample.direction else None
    return replace(sample, id=id, items=items, strips=[flip_token(strip) for strip in reversed(sample.strips)],
                   answer=answer, image=sample.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def whatsup_mirror_pairs(composites: list[Composite], setting: Setting, n: int, seed: int) -> list[MirrorPair]:
    """`n` mirror pairs of What'sUp composites (object and strip patching, paper App. B.1, B.2): a composite
    queried left or right (alternating), against the same composite mirrored left to right, same query (its
    answer is the other object). Composites drawn with `seed`, without repeats while there are enough."""
    if not composites:
        raise UsageError("no What'sUp composites to pair: check data.whatsup_dir and setting.n_composites")
    rng = np.random.default_rng([seed, 3])
    order = rng.permutation(len(composites))
    pairs = []
    for k in range(n):
        composite = composites[order[k % len(composites)]]
        clean = composite_samples(composite, setting, (DIRECTIONS[k % 2],))[0]
        clean = replace(clean, id=f"{clean.id}_{k:04d}_clean")
        mirror = mirrored_sample(clean, composite.grid, clean.id.replace("_clean", "_mirror"))
        pairs.append(MirrorPair(clean, mirror, clean.answer, mirror.answer))
    return pairs


def whatsup_last_token_pairs(composites: list[Composite], setting: Setting, n: int, seed: int) -> list[LastTokenPair]:
    """`n` last-token pairs of What'sUp composites, as the synthetic ones (paper Fig 3): a clean composite
    (a, m, b) queried towards a, and a counterfactual composite (c, m, e) with the same reference m and two other
    objects, queried the opposite way. Clean composites drawn with `seed`; each takes the first composite (in a
    seeded order) that shares its reference and none of its objects; UsageError when none has such a partner."""
    rng = np.random.default_rng([seed, 4])
    order = [composites[i] for i in rng.permutation(len(composites))]
    candidates = []
    for composite in order:
        objects = {composite.items[0].name, composite.items[2].name}
        partner = next((other for other in order if other.items[1].name == composite.items[1].name
                        and not objects & {other.items[0].name, other.items[2].name}), None)
        if partner is not None:
            candidates.append((composite, partner))
    if not candidates:
        raise UsageError("no two What'sUp composites share a reference with four different objects: last-token "
                         "pairs need them (raise setting.n_composites, or use more photographs)")
    pairs = []
    for k in range(n):
        composite, partner = candidates[k % len(candidates)]
        direction = DIRECTIONS[k % 2]
        opposite = DIRECTIONS[1 - k % 2]
        clean = composite_samples(composite, setting, (direction,))[0]
        counterfactual = composite_samples(partner, setting, (opposite,))[0]
        clean = replace(clean, id=f"{clean.id}_{k:04d}_clean")
        counterfactual = replace(counterfactual, id=f"{counterfactual.id}_{k:04d}_counterfactual")
        ordering = clean.items[TARGET_POSITION[opposite]].answer
        pairs.append(LastTokenPair(clean, counterfactual, clean.answer, ordering, counterfactual.answer))
    return pairs


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """How many of `n` composites each split gets: cumulative fractions rounded, the last split taking the rest
    (so the sizes always sum to `n`). `fractions`: non-negative, summing to 1 (UsageError otherwise)."""
    names = list(fractions)
    values = np.array([float(fractions[name]) for name in names])
    if len(names) == 0 or (values < 0).any() or abs(values.sum() - 1) > 1e-6:
        raise UsageError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    bounds = np.round(np.cumsum(values) * n).astype(int)
    bounds[-1] = n
    return dict(zip(names, np.diff([0, *bounds.tolist()]).tolist(), strict=True))


def split_composites(composites: list[Composite], fractions: Mapping[str, float], seed: int
                     ) -> dict[str, list[Composite]]:
    """Disjoint splits by composite, sized by `split_sizes`, drawn with `seed`, each in pair order. Composites
    of different splits may still share a photo (one photo pairs with many others), never a composite image."""
    order = np.random.default_rng([seed, 1]).permutation(len(composites))
    splits, start = {}, 0
    for name, size in split_sizes(len(composites), fractions).items():
        splits[name] = [composites[i] for i in sorted(order[start:start + size].tolist())]
        start += size
    return splits


def load_splits(cfg: DictConfig) -> dict[str, list[Composite]]:
    """`load_composites(cfg)` split by `cfg.setting.splits` with `cfg.seed`."""
    return split_composites(load_composites(cfg), cfg.setting.splits, cfg.seed)


# --- stand-in photographs --------------------------------------------------------------------------------

STAND_IN_SIZE = (160, 120)                              # photo width, height
STAND_IN_REFERENCE_BOX = (62, 40, 98, 100)              # x0, y0, x1, y1 in the photo, exclusive ends
STAND_IN_OBJECT_BOX = {"left": (15, 60, 41, 90), "right": (119, 60, 145, 90), "on": (68, 20, 92, 40),
                       "under": (68, 100, 92, 118)}
STAND_IN_COLORS = {"mug": (230, 20, 20), "cap": (20, 200, 30), "beer-bottle": (30, 60, 230), "bowl": (240, 200, 0),
                   "bottle-of-mustard": (255, 120, 0), "chair": (200, 0, 220), "table": (0, 210, 210)}
# (object, reference) photographed left of, right of, on and under the reference, as in What'sUp Controlled-A
# (five objects with the chair, so that last-token pairs can give a clean composite's reference two other objects)
STAND_IN_COMBOS = (("mug", "chair"), ("cap", "chair"), ("beer-bottle", "chair"), ("bowl", "chair"),
                   ("bottle-of-mustard", "chair"), ("bowl", "table"), ("bottle-of-mustard", "table"), ("mug", "table"))
RELATION_WORDS = {"left_of": "to the left of", "right_of": "to the right of", "on": "on", "under": "under"}


def stand_in_photograph(obj: str, relation: str, reference: str, rng: np.random.Generator) -> Image.Image:
    """A STAND_IN_SIZE photo: noisy grey, the reference's color block at STAND_IN_REFERENCE_BOX and the
    object's at STAND_IN_OBJECT_BOX[side] (names with hyphens, as in file names; colors STAND_IN_COLORS)."""
    width, height = STAND_IN_SIZE
    grey = rng.integers(90, 150, size=(height, width, 1)) + rng.integers(-8, 9, size=(height, width, 3))
    pixels = grey.clip(0, 255).astype(np.uint8)
    for (x0, y0, x1, y1), color in ((STAND_IN_REFERENCE_BOX, STAND_IN_COLORS[reference]),
                                    (STAND_IN_OBJECT_BOX[relation.removesuffix("_of")], STAND_IN_COLORS[obj])):
        pixels[y0:y1, x0:x1] = color
    return Image.fromarray(pixels)


def stand_in_boxes(combos=STAND_IN_COMBOS) -> dict[str, dict[str, list[int]]]:
    """The known boxes of the stand-in left_of / right_of photos of `combos`, as a box file's entries (the
    blocks are drawn exactly there): stand-in ground truth, not a detector's output."""
    return {f"{obj}_{relation}_{reference}.jpeg": {"object": list(STAND_IN_OBJECT_BOX[SIDE_OF_RELATION[relation]]),
                                                   "reference": list(STAND_IN_REFERENCE_BOX)}
            for obj, reference in combos for relation in SIDE_OF_RELATION}


def write_stand_in(root, combos=STAND_IN_COMBOS, images: bool = True, seed: int = 0) -> Path:
    """Write controlled_images_dataset.json and controlled_images/*.jpeg under `root` as What'sUp ships them:
    every (object, reference) of `combos` (names with hyphens) in the four relations, and `root`/boxes.json,
    the known boxes of the left_of / right_of photos (stand_in_boxes). `images=False` writes empty files
    (enough for pairing, which reads names only). Returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "controlled_images").mkdir(parents=True)
    entries = []
    for obj, reference in combos:
        for relation, words in RELATION_WORDS.items():
            name = f"{obj}_{relation}_{reference}.jpeg"
            captions = [f"A {obj.replace('-', ' ')} {w} a {reference}" for w in RELATION_WORDS.values() if w != words]
            entries.append({"image_path": f"data/controlled_images/{name}",
                            "caption_options": [f"A {obj.replace('-', ' ')} {words} a {reference}", *captions]})
            path = root / "controlled_images" / name
            if images:
                stand_in_photograph(obj, relation, reference, rng).save(path, quality=95)
            else:
                path.touch()
    (root / SUBSETS["controlled_images"]).write_text(json.dumps(entries))
    write_boxes(root / BOXES_FILE, stand_in_boxes(combos))
    return root
