"""Stand-in What'sUp data for tests and CPU demos, in the real layout (data_gen/whatsup/photos.py): a noisy grey
photo, the reference as one colored block in the middle and the object as another block on its side, every
(object, reference) of STAND_IN_COMBOS photographed left of, right of, on and under its reference, as in What'sUp
Controlled-A, so every composite has a data mirror. DIR/boxes.json holds the blocks' known boxes
(STAND_IN_OBJECT_BOX, STAND_IN_REFERENCE_BOX): stand-in ground truth, not a detector's output.

    python -m data_gen.whatsup stand_in data.whatsup_dir=DIR [seed=0]
    python -m data_gen.whatsup stand_in data.whatsup_dir=DIR stand_in.combos=controlled_a   # the paper's counts

`stand_in.combos: controlled_a` photographs Controlled-A's own 103 object-reference combinations (31 with the
armchair, 45 with the chair, 27 with the table: 3612 composites, enough for the paper's 1074), each block colored
as the What'sUp setting's item: for timing the paper's What'sUp figures at full size (the numbers mean nothing).
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_gen.whatsup.boxes import BOXES_FILE, write_boxes
from data_gen.whatsup.photos import SIDE_OF_RELATION, SUBSETS

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
# What'sUp Controlled-A's object-reference combinations (its left_of / right_of photos' file names): 31 with the
# armchair, 45 with the chair, 27 with the table
CONTROLLED_A = {
    "armchair": "apple beer-bottle book bottle bowl bread can cap cup glass glasses glove headphones laptop mug "
                "notepad orange pan phone pillow plate remote rose scarf soda-can sunglasses tape water-bottle "
                "wineglass yarn banjo",
    "chair": "ball-of-yarn banana beer-bottle blanket book bottle bottle-of-mustard bottle-of-orange-juice bowl box "
             "can cap cup dragonfruit hat headphones helmet kettle knife lamp laptop lemon microphone mug "
             "orange oven-mitt painting pan photograph pillow plant plate pot remote scarf scissors shoes "
             "spatula sunglasses toilet-roll toy-cactus vase water-bottle water-filter wineglass",
    "table": "ball-of-yarn banana book bottle bowl cap cup dog dragonfruit helmet kettle knife lamp lemon mug "
             "orange painting phone pillow plant plate scarf scissors spatula sunglasses toilet-roll wineglass",
}
CONTROLLED_A_COMBOS = tuple((obj, reference) for reference, objects in CONTROLLED_A.items() for obj in objects.split())
COMBOS = ("demo", "controlled_a")


def setting_colors(items) -> dict[str, tuple[int, int, int]]:
    """{name with hyphens: rgb} of the What'sUp setting's items, the stand-in blocks' colors."""
    return {str(item["name"]).replace(" ", "-"): tuple(int(v) for v in item["rgb"]) for item in items}


def stand_in_photograph(obj: str, relation: str, reference: str, rng: np.random.Generator,
                        colors=STAND_IN_COLORS) -> Image.Image:
    """A STAND_IN_SIZE photo: noisy grey, the reference's color block at STAND_IN_REFERENCE_BOX and the
    object's at STAND_IN_OBJECT_BOX[side] (names with hyphens, as in file names; `colors` by name)."""
    width, height = STAND_IN_SIZE
    grey = rng.integers(90, 150, size=(height, width, 1)) + rng.integers(-8, 9, size=(height, width, 3))
    pixels = grey.clip(0, 255).astype(np.uint8)
    for (x0, y0, x1, y1), color in ((STAND_IN_REFERENCE_BOX, colors[reference]),
                                    (STAND_IN_OBJECT_BOX[relation.removesuffix("_of")], colors[obj])):
        pixels[y0:y1, x0:x1] = color
    return Image.fromarray(pixels)


def stand_in_boxes(combos=STAND_IN_COMBOS) -> dict[str, dict[str, list[int]]]:
    """The known boxes of the stand-in left_of / right_of photos of `combos`, as a box file's entries (the
    blocks are drawn exactly there): stand-in ground truth, not a detector's output."""
    return {f"{obj}_{relation}_{reference}.jpeg": {"object": list(STAND_IN_OBJECT_BOX[SIDE_OF_RELATION[relation]]),
                                                   "reference": list(STAND_IN_REFERENCE_BOX)}
            for obj, reference in combos for relation in SIDE_OF_RELATION}


def write_stand_in(root, combos=STAND_IN_COMBOS, images: bool = True, seed: int = 0, colors=STAND_IN_COLORS) -> Path:
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
                stand_in_photograph(obj, relation, reference, rng, colors).save(path, quality=95)
            else:
                path.touch()
    (root / SUBSETS["controlled_images"]).write_text(json.dumps(entries))
    write_boxes(root / BOXES_FILE, stand_in_boxes(combos))
    return root
