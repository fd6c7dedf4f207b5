"""Reading a What'sUp directory: its annotation file and the left_of / right_of photographs it names.

Layout read under `data.whatsup_dir` (as published with github.com/amitakamath/whatsup_vlms, see its
`dataset_zoo/aro_datasets.py`, and in the Hugging Face dataset AdaptVis/all_datasets):

    controlled_images_dataset.json   [{"image_path": "data/controlled_images/beer-bottle_left_of_armchair.jpeg",
                                       "caption_options": ["A beer bottle to the left of a armchair", ...]}, ...]
    controlled_images/<object>_<relation>_<reference>.jpeg

The first caption is the true one. Relations: left_of, right_of, on, under (subset `controlled_clevr`,
What'sUp Controlled-B: left_of, right_of, in-front_of, behind); hyphens stand for spaces in names. Only the
left_of and right_of photos are used, found by file name in `<subset>/`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError, check_choice

SUBSETS = {"controlled_images": "controlled_images_dataset.json", "controlled_clevr": "controlled_clevr_dataset.json"}
SIDE_OF_RELATION = {"left_of": "left", "right_of": "right"}
CAPTION_WORDS = {"left": "left of", "right": "right of"}


def get_data_hint(subset: str) -> str:
    """Where to get the data, for error messages."""
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

    @property
    def key(self) -> tuple[str, str, str]:
        """(object, side, reference): what identifies a photo in a subset."""
        return self.object, self.side, self.reference


def whatsup_root(path, subset: str = "controlled_images") -> Path:
    """`data.whatsup_dir` as a directory; UsageError naming the path and how to get the data otherwise."""
    check_choice("What'sUp subset", subset, SUBSETS)
    if path in (None, ""):
        raise UsageError(f"data.whatsup_dir is not set: {get_data_hint(subset)}")
    root = Path(str(path)).expanduser()
    if not root.is_dir():
        raise UsageError(f"data.whatsup_dir={root} does not exist: {get_data_hint(subset)}")
    return root


def read_photos(root: Path, subset: str = "controlled_images") -> list[Photo]:
    """The left_of and right_of photos of a What'sUp subset under `root`, in annotation order. UsageError when
    the annotation file or a photo it names is missing, or a file name contradicts its true caption."""
    check_choice("What'sUp subset", subset, SUBSETS)
    annotation = Path(root) / SUBSETS[subset]
    if not annotation.is_file():
        raise UsageError(f"{annotation} does not exist: {get_data_hint(subset)}")
    try:
        entries = json.loads(annotation.read_text())
    except ValueError as err:
        raise UsageError(f"{annotation} is not valid JSON: {err}") from err
    if not isinstance(entries, list):
        raise UsageError(f"{annotation} must hold a JSON list of {{image_path, caption_options}} entries")
    photos = []
    for k, entry in enumerate(entries):
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
            raise UsageError(f"{path} is missing (listed in {annotation.name}); every photo the annotation file "
                             f"names must be in {subset}/")
        photos.append(Photo(path, parts[0].replace("-", " "), side, parts[-1].replace("-", " ")))
    return photos
