"""What'sUp composites (docs/experiments.md, "What'sUp composites"; paper section 3.1): two What'sUp Controlled
photographs that share their reference object merged into one image of three objects in a row.

One module per job:
- `photos`: reading `data.whatsup_dir` (the annotation file and the left_of / right_of photos it names);
- `boxes`: the object box file (`data.whatsup_boxes`), placing boxes on a composite;
- `composites`: the composites, drawn from the seed alone (`n_composites` of every pair; one set for every
  experiment), their samples, `with_boxes` for the experiments that need boxes;
- `splits`: train / val / test by composite (`split_sizes` gives their sizes, as the dry run counts them);
- `pairs`: mirror pairs (the data mirror by default, or a flip) and last-token pairs for the patching panels;
- `stand_in`: stand-in photographs and their known boxes for tests and CPU demos;
- `detect`: the `boxes` command (an open-vocabulary detector).

Count: Controlled-A photographs 103 object-reference combinations (31 with the armchair, 45 with the chair,
27 with the table), each with the object left, right, on and under. Ordered pairs (a left of r, b right of
r, a != b) give 31*30 + 45*44 + 27*26 = 3612 composites. The paper reports 1074 without saying how it chose
them, so `n_composites` (default 1074) draws that many uniformly from all pairs with the run's seed.

Command line (Hydra overrides of configs/whatsup_data.yaml after the subcommand, as every command here):

    python -m data_gen.whatsup stand_in data.whatsup_dir=DIR [seed=0]     (or: stand_in DIR)
    python -m data_gen.whatsup boxes data.whatsup_dir=DIR [data.whatsup_boxes=FILE] [detector.threshold=0.1 ...]

`boxes` runs the detector of `detector:` (OWLv2 by default) on every left_of/right_of photo and writes the box
file to data.whatsup_boxes (default DIR/boxes.json); then pass data.whatsup_boxes=FILE to the experiments.
"""

from data_gen.whatsup.boxes import (
    BOX_KEYS,
    BOXES_FILE,
    MIN_KEPT_AREA,
    covering_token_box,
    load_box_entries,
    make_boxes_hint,
    read_boxes,
    require_boxes,
    write_boxes,
)
from data_gen.whatsup.composites import (
    DIRECTIONS,
    Composite,
    WhatsUp,
    composite_samples,
    load_composites,
    load_whatsup,
    pair_photos,
    part_columns,
    with_boxes,
)
from data_gen.whatsup.pairs import MIRRORS, mirrored_sample, whatsup_last_token_pairs, whatsup_mirror_pairs
from data_gen.whatsup.photos import SIDE_OF_RELATION, SUBSETS, Photo, read_photos, whatsup_root
from data_gen.whatsup.splits import load_splits, require_splits, split_composites, split_sizes
from data_gen.whatsup.stand_in import (
    STAND_IN_COLORS,
    STAND_IN_COMBOS,
    STAND_IN_OBJECT_BOX,
    STAND_IN_REFERENCE_BOX,
    STAND_IN_SIZE,
    stand_in_boxes,
    stand_in_photograph,
    write_stand_in,
)

__all__ = [
    "BOX_KEYS", "BOXES_FILE", "DIRECTIONS", "MIN_KEPT_AREA", "MIRRORS", "SIDE_OF_RELATION", "STAND_IN_COLORS",
    "STAND_IN_COMBOS", "STAND_IN_OBJECT_BOX", "STAND_IN_REFERENCE_BOX", "STAND_IN_SIZE", "SUBSETS", "Composite",
    "Photo", "WhatsUp", "composite_samples", "covering_token_box", "load_box_entries", "load_composites",
    "load_splits", "load_whatsup", "make_boxes_hint", "mirrored_sample", "pair_photos", "part_columns",
    "read_boxes", "read_photos", "require_boxes", "require_splits", "split_composites", "split_sizes",
    "stand_in_boxes", "stand_in_photograph", "whatsup_last_token_pairs", "whatsup_mirror_pairs", "whatsup_root",
    "with_boxes", "write_boxes", "write_stand_in",
]
