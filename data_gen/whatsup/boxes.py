"""Object boxes of the What'sUp photographs (paper Fig 33: a probe trains on the tokens inside each object's box).

`data.whatsup_boxes` is a JSON file with one entry per left/right photo, in the photo's own pixels (exclusive
ends),

    {"beer-bottle_left_of_armchair.jpeg": {"object": [x0, y0, x1, y1], "reference": [x0, y0, x1, y1]}, ...}

made by an open-vocabulary detector (the `boxes` command, data_gen/whatsup/detect.py) or by hand. A box may be
null: the detector found no such object above its threshold. An entry may hold more keys (the detector adds
`scores`); they are ignored. The file must have an entry for every left/right photo of the directory (a file
made for other photos is refused).

On a composite, boxes are scaled to the composite and clipped to the item's part. A composite whose needed
box (object and reference of its left photo, object of its right one) is null ("not found") or keeps less than
MIN_KEPT_AREA of its area inside its part ("outside") carries no boxes; the experiments that need boxes drop
it and count it (data_gen.whatsup.composites.with_boxes). An item's token box covers every token its pixel box
overlaps.
"""

import json
import os
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image

from common.errors import UsageError
from common.geometry import Grid, PixelBox, TokenBox
from data_gen.whatsup.photos import Photo

MIN_KEPT_AREA = 0.5     # a tight box must keep this much of its area inside its part
BOX_KEYS = ("object", "reference")
BOXES_FILE = "boxes.json"   # default box file under data.whatsup_dir (the `boxes` and `stand_in` commands)
NOT_FOUND, OUTSIDE = "not found", "outside"     # why a photo's boxes cannot be placed on a composite


def make_boxes_hint(whatsup_dir=None) -> str:
    """How to make a box file, for error messages."""
    where = whatsup_dir if whatsup_dir not in (None, "") else "DIR"
    return (f"make them with `python -m data_gen.whatsup boxes data.whatsup_dir={where}` (an open-vocabulary "
            f"detector), then pass data.whatsup_boxes=FILE")


def require_boxes(cfg: DictConfig, what: str) -> Path:
    """The box file `cfg.data.whatsup_boxes`; a one-line UsageError saying how to make one when it is not set
    or missing. Called by every run that trains on the tokens inside the items' boxes (`what` names it):
    without a box file the composites carry no boxes."""
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


def read_boxes_for(path, photos: list[Photo], whatsup_dir) -> dict[str, dict[str, PixelBox | None]]:
    """`read_boxes(path)`, refused in one line when it lacks an entry for any of `photos` (a box file made for
    other photos)."""
    boxes = read_boxes(path)
    missing = [p.path.name for p in photos if p.path.name not in boxes]
    if missing:
        raise UsageError(f"data.whatsup_boxes={path} has no entry for {len(missing)} of the {len(photos)} left/right "
                         f"photos of {whatsup_dir} (e.g. {missing[0]}): it was made for other photos; "
                         f"{make_boxes_hint(whatsup_dir)}")
    return boxes


def write_boxes(file, entries: dict) -> None:
    """Write a box file atomically (a temporary file beside it renamed into place), entries sorted by name."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(sorted(entries.items())), indent=1) + "\n")
    os.replace(tmp, file)


def covering_token_box(grid: Grid, box: PixelBox) -> TokenBox:
    """(row0, col0, row1, col1) of every token that pixel box (x0, y0, x1, y1) overlaps."""
    x0, y0, x1, y1 = box
    p = grid.pixels_per_token
    return (y0 // p, x0 // p, -(-y1 // p), -(-x1 // p))


def _area(box: PixelBox) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def place_boxes(photo: Photo, grid: Grid, columns, boxes) -> list[PixelBox | None] | str:
    """The photo's item boxes on a composite: [object, reference] for a left photo, [object] for a right one.
    None for each without a box file (`boxes` None); else its scaled boxes clipped to their parts, or why they
    cannot be placed (NOT_FOUND: a needed box is null; OUTSIDE: one keeps less than MIN_KEPT_AREA of its area)."""
    p = grid.pixels_per_token
    parts = [(columns[k] * p, 0, columns[k + 1] * p, grid.height) for k in range(3)]
    wanted = [("object", parts[0]), ("reference", parts[1])] if photo.side == "left" else [("object", parts[2])]
    if boxes is None:
        return [None for _ in wanted]
    if any(boxes[photo.path.name][key] is None for key, _ in wanted):
        return NOT_FOUND
    with Image.open(photo.path) as image:
        width, height = image.size
    placed = []
    for key, part in wanted:
        x0, y0, x1, y1 = boxes[photo.path.name][key]
        scaled = (x0 * grid.width // width, y0 * grid.height // height,
                  -(-x1 * grid.width // width), -(-y1 * grid.height // height))
        clipped = (max(scaled[0], part[0]), max(scaled[1], part[1]), min(scaled[2], part[2]), min(scaled[3], part[3]))
        if _area(clipped) < MIN_KEPT_AREA * _area(scaled):
            return OUTSIDE
        placed.append(clipped)
    return placed
