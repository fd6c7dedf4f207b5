"""What'sUp composites on stand-in photographs written in the real layout (JSON + JPEGs) by
data_gen.whatsup.write_stand_in: a noisy grey background, the reference as one colored block in the middle and
the object as another block on its side, with the blocks' known boxes in boxes.json."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UsageError
from common.geometry import Grid, token_indices
from common.results import load_unit
from data_gen.samples import setting_mirror_pairs
from data_gen.settings import Setting
from data_gen.whatsup import (
    STAND_IN_COLORS,
    STAND_IN_COMBOS,
    STAND_IN_OBJECT_BOX,
    STAND_IN_REFERENCE_BOX,
    STAND_IN_SIZE,
    composite_samples,
    covering_token_box,
    load_composites,
    load_splits,
    load_whatsup,
    mirrored_sample,
    pair_photos,
    read_photos,
    require_boxes,
    split_composites,
    split_sizes,
    stand_in_boxes,
    whatsup_last_token_pairs,
    whatsup_mirror_pairs,
    with_boxes,
    write_stand_in,
)
from data_gen.whatsup.stand_in import CONTROLLED_A_COMBOS, setting_colors
from patching.experiments import mirror_plan
from runner import run_unit
from tests.helpers import load_twin, make_cfg, run_plot, stand_in_dir, whatsup_cfg, without_photos
from vlm.scoring import AnswerScorer, candidate_probabilities

REPO = Path(__file__).resolve().parent.parent
COLORS = STAND_IN_COLORS
COMBOS = list(STAND_IN_COMBOS)
OBJECT_BOX, REFERENCE_BOX = STAND_IN_OBJECT_BOX, STAND_IN_REFERENCE_BOX

# every object-reference combination of the real Controlled-A (controlled_images_dataset.json), by reference
def write_dataset(root, combos=COMBOS, images=True, seed=0):
    return write_stand_in(root, combos, images, seed)


def cfg_for(root, model="tiny_qwen2vl", *overrides):
    return whatsup_cfg(root, model, *overrides)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return stand_in_dir(tmp_path_factory)


def expected_pairs(combos):
    return {(a, r, b) for a, r in combos for b, r2 in combos if r == r2 and a != b}


def test_pairs_share_the_reference_and_hold_one_object_each_side(dataset):
    photos = read_photos(dataset)
    assert {p.side for p in photos} == {"left", "right"}     # on / under photos are left out
    assert len(photos) == 2 * len(COMBOS)
    pairs = pair_photos(photos)
    for left, right in pairs:
        assert (left.side, right.side) == ("left", "right")
        assert left.reference == right.reference and left.object != right.object
        assert left.path.name == f"{left.object.replace(' ', '-')}_left_of_{left.reference}.jpeg"
    found = {(a.object.replace(" ", "-"), a.reference, b.object.replace(" ", "-")) for a, b in pairs}
    assert found == expected_pairs(COMBOS) and len(pairs) == len(found)


def test_real_controlled_a_gives_3612_composites_and_every_name_is_an_item(tmp_path):
    combos = list(CONTROLLED_A_COMBOS)
    assert len(combos) == 103
    root = write_dataset(tmp_path, combos, images=False)    # pairing reads names only
    assert len(pair_photos(read_photos(root))) == 31 * 30 + 45 * 44 + 27 * 26 == 3612
    composites = load_composites(cfg_for(root, "tiny_qwen2vl", "setting.n_composites=1074"))
    assert len(composites) == 1074 and len({c.id for c in composites}) == 1074
    colors = setting_colors(make_cfg("setting=whatsup").setting["items"])
    assert {name for combo in combos for name in combo} <= set(colors)   # the full-size stand-in colors them all


def color_mask(image: Image.Image, color, tolerance=60) -> np.ndarray:
    pixels = np.asarray(image).astype(int)
    return np.abs(pixels - np.array(color)).max(-1) < tolerance


def inside(mask: np.ndarray, box, margin=0) -> bool:
    """Whether the mask has pixels in `box` and none outside it grown by `margin` pixels."""
    x0, y0, x1, y1 = box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin
    outside = mask.copy()
    outside[y0:y1, x0:x1] = False
    return bool(mask[y0:y1, x0:x1].any()) and not outside.any()


@pytest.mark.parametrize("model", ["tiny_qwen2vl", "tiny_gemma3"])
def test_composite_is_token_aligned_and_boxes_hold_their_objects(dataset, model):
    cfg = cfg_for(dataset, model, f"data.whatsup_boxes={dataset / 'boxes.json'}")
    grid = Grid.from_config(cfg.model.grid)
    composites = load_composites(cfg)
    blur = math.ceil(max(grid.width / STAND_IN_SIZE[0], grid.height / STAND_IN_SIZE[1]))
    assert {c.id for c in composites} == {"_".join(t) for t in expected_pairs(COMBOS)}
    for composite in composites[:4]:
        image = composite.image()
        assert image.size == (grid.width, grid.height)
        names = [composite.left.object, composite.left.reference, composite.right.object]
        for position, (item, name) in enumerate(zip(composite.items, names, strict=True)):
            assert item.position == position and item.name == name
            x0, y0, x1, y1 = item.pixel_box
            assert 0 <= x0 < x1 <= grid.width and 0 <= y0 < y1 <= grid.height
            # resizing the photo blurs a block's edge by less than one photo pixel
            assert inside(color_mask(image, COLORS[name.replace(" ", "-")]), item.pixel_box, margin=blur)
            row0, col0, row1, col1 = item.token_box
            assert 0 <= row0 < row1 <= grid.rows and 0 <= col0 < col1 <= grid.cols
            assert item.token_box == covering_token_box(grid, item.pixel_box)
            strip = composite.strips[position]                                # parts are full-height bands
            assert strip == (0, composite.columns[position], grid.rows, composite.columns[position + 1])
            assert strip[1] <= col0 and col1 <= strip[3] and (row0, row1) != (0, grid.rows)   # inside, tighter
    if model == "tiny_qwen2vl":
        assert composites[0].columns == (0, 4, 8, 12)


def test_without_a_box_file_composites_carry_no_boxes_and_box_runs_refuse(dataset):
    """No box file: no item has a box (a composite's third is never taken for an object's box), strips are still
    the parts, the queried samples (accuracy) are made as before, and require_boxes stops the probes in one line
    saying how to make boxes."""
    cfg = cfg_for(dataset)
    composites = load_composites(cfg)
    assert len(composites) == len(expected_pairs(COMBOS))
    for composite in composites:
        assert all(item.pixel_box is None and item.token_box is None for item in composite.items)
        assert composite.strips == [(0, 0, 12, 4), (0, 4, 12, 8), (0, 8, 12, 12)]
    setting = Setting.from_config(cfg.setting)
    left, right = composite_samples(composites[0], setting)
    assert (left.answer, right.answer) == (composites[0].items[0].answer, composites[0].items[2].answer)
    with pytest.raises(UsageError) as err:
        require_boxes(cfg, "experiment=whatsup_probes")
    message = str(err.value)
    assert "\n" not in message and "data.whatsup_boxes is not set" in message
    assert f"python -m data_gen.whatsup boxes data.whatsup_dir={dataset}" in message
    assert "data.whatsup_boxes=FILE" in message
    with pytest.raises(UsageError, match="data.whatsup_boxes=/no/boxes.json does not exist: make them with"):
        require_boxes(cfg_for(dataset, "tiny_qwen2vl", "data.whatsup_boxes=/no/boxes.json"), "amplification")
    assert require_boxes(cfg_for(dataset, "tiny_qwen2vl", f"data.whatsup_boxes={dataset / 'boxes.json'}"),
                         "x") == dataset / "boxes.json"


def test_known_boxes_map_to_exactly_the_tokens_they_cover(dataset):
    """The stand-ins' known boxes (a 160 x 120 photo) on Qwen2-VL's 12 x 12 grid of 28 px tokens (336 x 336),
    by hand: x scales by 336/160 = 2.1, y by 336/120 = 2.8; starts are floored, ends rounded up, then tokens
    [start // 28, ceil(end / 28)).
      left object  (15, 60, 41, 90)   -> (31, 168, 87, 252)   (31.5, 86.1 -> 31, 87)   cols [1, 4)  rows [6, 9)
      reference    (62, 40, 98, 100)  -> (130, 112, 206, 280) (130.2, 205.8)           cols [4, 8)  rows [4, 10)
      right object (119, 60, 145, 90) -> (249, 168, 305, 252) (249.9, 304.5)           cols [8, 11) rows [6, 9)
    Each lies inside its part (cols [0, 4), [4, 8), [8, 12)), so nothing is clipped."""
    cfg = cfg_for(dataset, "tiny_qwen2vl", f"data.whatsup_boxes={dataset / 'boxes.json'}")
    assert json.loads((dataset / "boxes.json").read_text()) == stand_in_boxes(COMBOS)
    composites = load_composites(cfg)
    assert len(composites) == len(expected_pairs(COMBOS))
    for composite in composites:
        assert [item.pixel_box for item in composite.items] == [(31, 168, 87, 252), (130, 112, 206, 280),
                                                               (249, 168, 305, 252)]
        assert [item.token_box for item in composite.items] == [(6, 1, 9, 4), (4, 4, 10, 8), (6, 8, 9, 11)]
    tokens = [set(token_indices(Grid.from_config(cfg.model.grid), item.token_box)) for item in composites[0].items]
    assert tokens[0] == {12 * r + c for r in (6, 7, 8) for c in (1, 2, 3)}
    assert tokens[1] == {12 * r + c for r in range(4, 10) for c in range(4, 8)}
    assert tokens[2] == {12 * r + c for r in (6, 7, 8) for c in (8, 9, 10)}


def test_samples_prompt_about_the_reference_and_answer_the_queried_side(dataset):
    cfg = cfg_for(dataset)
    setting = Setting.from_config(cfg.setting)
    composite = next(c for c in load_composites(cfg) if c.id == "bottle-of-mustard_table_mug")
    left, right = composite_samples(composite, setting)
    assert (left.direction, left.answer) == ("left", "bottle of mustard")       # the dataset's own name
    assert (right.direction, right.answer) == ("right", "mug")
    assert left.prompt == "The object on the floor to the left of the table is"
    assert right.prompt == "The object on the floor to the right of the table is"
    assert left.setting == "whatsup" and left.orientation == "horizontal" and left.image is right.image
    assert [i.answer for i in left.items] == ["bottle of mustard", "table", "mug"]


def test_every_answer_is_the_photos_object_name():
    """configs/setting/whatsup.yaml: each item's answer is its name (the file-name stem with spaces), never a
    word chosen to dodge a tokenizer; every name of the real Controlled-A is an item."""
    setting = Setting.from_config(make_cfg("setting=whatsup").setting)
    assert all(item.answer == item.name for item in setting.items)
    names = {name.replace("-", " ") for combo in CONTROLLED_A_COMBOS for name in combo}
    assert names == set(setting.item_names)


def test_same_seed_same_composites_other_seed_other_draw(dataset):
    first = load_composites(cfg_for(dataset, "tiny_qwen2vl", "setting.n_composites=5"))
    again = load_composites(cfg_for(dataset, "tiny_qwen2vl", "setting.n_composites=5"))
    other = load_composites(cfg_for(dataset, "tiny_qwen2vl", "setting.n_composites=5", "seed=1"))
    assert [c.id for c in first] == [c.id for c in again] and len(first) == 5
    assert [c.id for c in first] != [c.id for c in other]
    assert np.array_equal(np.asarray(first[0].image()), np.asarray(again[0].image()))


def test_missing_directory_names_the_path_and_where_to_get_the_data(tmp_path):
    missing = tmp_path / "no_whatsup_here"
    with pytest.raises(UsageError, match="no_whatsup_here.*AdaptVis/all_datasets"):
        load_composites(cfg_for(missing))
    with pytest.raises(UsageError, match="data.whatsup_dir is not set"):
        load_composites(make_cfg("model=tiny_qwen2vl", "setting=whatsup"))


def test_a_photo_the_annotation_names_but_the_directory_lacks_is_refused_in_one_line(dataset, tmp_path):
    root = without_photos(dataset, tmp_path / "w", [])
    (root / "controlled_images" / "cap_right_of_chair.jpeg").unlink()
    with pytest.raises(UsageError) as err:
        load_composites(cfg_for(root))
    message = str(err.value)
    assert "\n" not in message and "cap_right_of_chair.jpeg is missing" in message
    assert "controlled_images_dataset.json" in message


def test_a_box_file_made_for_other_photos_is_refused_in_one_line(dataset, tmp_path):
    other = tmp_path / "other_boxes.json"
    other.write_text(json.dumps(stand_in_boxes([("mug", "armchair"), ("cap", "armchair")])))
    with pytest.raises(UsageError) as err:
        load_composites(cfg_for(dataset, "tiny_qwen2vl", f"data.whatsup_boxes={other}"))
    message = str(err.value)
    assert "\n" not in message and "has no entry for 16 of the 16 left/right photos" in message
    assert "made for other photos" in message and "python -m data_gen.whatsup boxes" in message


def test_splits_are_disjoint_by_composite_and_deterministic(dataset):
    cfg = cfg_for(dataset)
    composites = load_composites(cfg)
    splits = load_splits(cfg)
    ids = {name: {c.id for c in split} for name, split in splits.items()}
    assert set(ids) == {"train", "val", "test"}
    assert sum(map(len, ids.values())) == len(composites) == len(set.union(*ids.values()))
    assert abs(len(ids["train"]) - 0.6 * len(composites)) <= 1
    assert {n: [c.id for c in s] for n, s in load_splits(cfg).items()} == {n: [c.id for c in s]
                                                                           for n, s in splits.items()}
    with pytest.raises(UsageError, match="sum to 1"):
        split_composites(composites, {"train": 0.5, "test": 0.6}, 0)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 26, 1074, 3612])
@pytest.mark.parametrize("fractions", [{"train": 0.6, "val": 0.1, "test": 0.3}, {"a": 0.25, "b": 0.25, "c": 0.5},
                                       {"train": 1 / 3, "val": 1 / 3, "test": 1 / 3}])
def test_split_sizes_are_the_sizes_the_splitter_cuts(n, fractions):
    """split_sizes (what the dry run counts with) against the splitter itself, on n stand-ins for composites."""
    splits = split_composites(list(range(n)), fractions, seed=3)
    assert split_sizes(n, fractions) == {name: len(part) for name, part in splits.items()}
    assert sorted(c for part in splits.values() for c in part) == list(range(n))


def test_paper_split_sizes():
    """1074 composites 60/10/30: cumulative bounds round(644.4) = 644, round(751.8) = 752, 1074."""
    assert split_sizes(1074, {"train": 0.6, "val": 0.1, "test": 0.3}) == {"train": 644, "val": 108, "test": 322}


def test_box_file_gives_tight_boxes_and_drops_only_for_box_runs(tmp_path):
    """One set: a box file whose cap-left box lies over the middle part changes no composite and no split; the
    composites of that photo carry no boxes (box_issue "outside"), and with_boxes drops and counts them."""
    root = write_dataset(tmp_path / "data")
    boxes = stand_in_boxes(COMBOS)
    assert boxes["cap_left_of_chair.jpeg"] == {"object": list(OBJECT_BOX["left"]), "reference": list(REFERENCE_BOX)}
    boxes["cap_left_of_chair.jpeg"]["object"] = [70, 60, 90, 90]          # over the middle part
    boxes["mug_right_of_table.jpeg"]["object"] = None                     # not found by a detector
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    cfg = cfg_for(root, "tiny_qwen2vl", f"data.whatsup_boxes={tmp_path / 'boxes.json'}")
    composites = load_composites(cfg)
    plain = load_composites(cfg_for(root))
    assert [c.id for c in composites] == [c.id for c in plain] and len(composites) == len(expected_pairs(COMBOS))
    assert ({n: [c.id for c in s] for n, s in load_splits(cfg).items()}
            == {n: [c.id for c in s] for n, s in load_splits(cfg_for(root)).items()})
    outside = [c for c in composites if c.left.object == "cap" and c.left.reference == "chair"]
    not_found = [c for c in composites if c.right.object == "mug" and c.right.reference == "table"]
    assert {c.box_issue for c in outside} == {"outside"} and {c.box_issue for c in not_found} == {"not found"}
    assert all(not c.has_boxes and all(i.token_box is None for i in c.items) for c in outside + not_found)
    kept, record = with_boxes(composites)
    chair_objects = [obj for obj, reference in COMBOS if reference == "chair"]
    assert record == {"n": len(composites), "with_boxes": len(kept), "dropped_box_not_found": 2,
                      "dropped_box_outside": len(chair_objects) - 1}        # (x, table, mug): bowl, mustard
    assert len(kept) == len(composites) - 2 - (len(chair_objects) - 1)
    grid = Grid.from_config(cfg.model.grid)
    composite = kept[0]
    image = composite.image()
    for item, strip in zip(composite.items, composite.strips, strict=True):
        x0, y0, x1, y1 = item.pixel_box
        assert (x1 - x0) * (y1 - y0) < grid.pixels_per_token**2 * grid.rows * 3    # tighter than its part
        # a tight box may lose a pixel row to the blur of resizing the photo
        assert inside(color_mask(image, COLORS[item.name.replace(" ", "-")]), item.pixel_box, margin=1)
        assert strip[1] <= item.token_box[1] and item.token_box[3] <= strip[3]


@pytest.mark.parametrize("model", ["tiny_qwen2vl", "tiny_gemma3"])
def test_every_whatsup_answer_gets_a_score_on_both_real_vocabularies(dataset, model):
    """With the dataset's names, first tokens are shared between What'sUp answers on both vocabularies (Qwen2:
    `Ban` starts Banana and Banjo, ` bottle` starts bottle and bottle of mustard; Gemma 3: `bottle` likewise), so
    every answer is scored whole, and ` bottle` is a prefix of two other answers (the end-of-answer rule)."""
    twin = load_twin(model)
    cfg = cfg_for(dataset, twin.name)
    setting = Setting.from_config(cfg.setting)
    scorer = AnswerScorer(twin.tokenizer, setting.candidates)
    assert len(setting.candidates) == 61 and not scorer.exact
    bottle = scorer.forms[scorer.index("bottle")]
    assert set(scorer.continuations) == set(bottle) and len(bottle) == 4     # only bottle's forms continue
    of = twin.tokenizer(" of", add_special_tokens=False)["input_ids"]
    assert all([scorer.sequences[row][len(form)] for row in rows] == of
               for form, rows in scorer.continuations.items())
    samples = composite_samples(load_composites(cfg)[0], setting)
    inputs = twin.encode([s.image for s in samples], [s.prompt for s in samples])
    probabilities, _ = candidate_probabilities(twin, scorer, inputs)
    assert probabilities.shape == (2, 61) and bool((probabilities > 0).all()) and bool(probabilities.isfinite().all())


# --- the patching figures' What'sUp panels ----------------------------------------------------------------------

def test_flip_option_swaps_the_objects_and_flips_their_boxes(dataset):
    cfg = cfg_for(dataset, "tiny_qwen2vl", f"data.whatsup_boxes={dataset / 'boxes.json'}", "setting.mirror=flip",
                  "experiment=object_patching", "n_pairs=4")
    grid = Grid.from_config(cfg.model.grid)
    pairs, record = setting_mirror_pairs(cfg, boxes=True)
    assert record == {"mirror": "flip", "n": 26, "without_data_mirror": 0, "without_boxes": 0, "usable": 26}
    for pair in pairs:
        clean, mirror = pair.clean, pair.counterfactual
        assert [i.name for i in mirror.items] == [i.name for i in reversed(clean.items)]
        assert mirror.prompt == clean.prompt and pair.swapped_answer == mirror.answer != clean.answer
        assert pair.clean_answer == clean.answer and pair.object_boxes is None
        flipped = np.asarray(clean.image)[:, ::-1]
        np.testing.assert_array_equal(np.asarray(mirror.image), flipped)
        for k in range(3):
            x0, y0, x1, y1 = mirror.items[2 - k].pixel_box
            np.testing.assert_array_equal(np.asarray(mirror.image)[y0:y1, x0:x1],
                                          flipped[y0:y1, x0:x1])
            assert mirror.items[2 - k].pixel_box == (grid.width - clean.items[k].pixel_box[2], clean.items[k].pixel_box[1],
                                                     grid.width - clean.items[k].pixel_box[0], clean.items[k].pixel_box[3])
            # the same object's pixels: the clean box's columns, read right to left
            x0, y0, x1, y1 = clean.items[k].pixel_box
            mx0 = grid.width - x1
            np.testing.assert_array_equal(np.asarray(mirror.image)[y0:y1, mx0:mx0 + (x1 - x0)],
                                          np.asarray(clean.image)[y0:y1, x0:x1][:, ::-1])
        back = mirrored_sample(mirror, grid, "back")
        assert [i.token_box for i in back.items] == [i.token_box for i in clean.items]
        assert back.strips == clean.strips


def test_data_mirror_is_the_datasets_photos_with_the_objects_swapped(dataset):
    """The default mirror of (X, ref, Y): the composite of the photos `Y_left_of_ref` and `X_right_of_ref`, same
    query, so the mirror's answer is the other object; same parts (strips). Object patching swaps, on each side,
    the covering box of the object's boxes in both images, by hand on Qwen2-VL's grid: X left (6, 1, 9, 4), X in
    the mirror's right part (6, 8, 9, 11) moved 8 columns left (6, 0, 9, 3): cover (6, 0, 9, 4); right side (6,
    8, 9, 12); clean left <- mirror right is then the translation by 8 columns, and each region holds its object
    in both images."""
    cfg = cfg_for(dataset, "tiny_qwen2vl", f"data.whatsup_boxes={dataset / 'boxes.json'}",
                  "experiment=object_patching", "n_pairs=6")
    grid = Grid.from_config(cfg.model.grid)
    pairs, record = setting_mirror_pairs(cfg, boxes=True)
    assert record == {"mirror": "data", "n": 26, "without_data_mirror": 0, "without_boxes": 0, "usable": 26}
    data = load_whatsup(cfg)
    for pair in pairs:
        clean, mirror = pair.clean, pair.counterfactual
        x, ref, y = (i.name.replace(" ", "-") for i in clean.items)
        assert [i.name for i in mirror.items] == [clean.items[2].name, ref, clean.items[0].name]
        photos = [dataset / "controlled_images" / f"{y}_left_of_{ref}.jpeg",
                  dataset / "controlled_images" / f"{x}_right_of_{ref}.jpeg"]
        left, right = (next(p for p in data.photos.values() if p.path == path) for path in photos)
        np.testing.assert_array_equal(np.asarray(mirror.image), np.asarray(data.composite(left, right).image()))
        assert mirror.prompt == clean.prompt and mirror.direction == clean.direction
        assert pair.swapped_answer == mirror.answer == clean.items[2 if clean.direction == "left" else 0].answer
        assert mirror.strips == clean.strips == [(0, 0, 12, 4), (0, 4, 12, 8), (0, 8, 12, 12)]
        clean_boxes, mirror_boxes = pair.regions("items")
        assert [clean_boxes[0], clean_boxes[2]] == [(6, 0, 9, 4), (6, 8, 9, 12)]
        assert [mirror_boxes[0], mirror_boxes[2]] == [(6, 0, 9, 4), (6, 8, 9, 12)]
        plan = mirror_plan(grid, pair, "items")
        left_tokens = len(token_indices(grid, clean_boxes[0]))
        assert plan.dst_tokens[:left_tokens] == [s - 8 for s in plan.src_tokens[:left_tokens]]       # left <- right
        assert plan.dst_tokens[left_tokens:] == [s + 8 for s in plan.src_tokens[left_tokens:]]       # right <- left
        for image, box, name in ((clean.image, clean_boxes[0], x), (mirror.image, mirror_boxes[2], x),
                                 (clean.image, clean_boxes[2], y), (mirror.image, mirror_boxes[0], y)):
            r0, c0, r1, c1 = box
            p = grid.pixels_per_token
            assert color_mask(image, COLORS[name])[r0 * p:r1 * p, c0 * p:c1 * p].sum() > 0.8 * (26 * 2.1) * (30 * 2.8)


def test_composites_without_a_data_mirror_are_left_out_and_counted(dataset, tmp_path):
    """Without mug_right_of_chair.jpeg, the chair composites are 5 left objects x 4 right ones (16 with two
    different objects); the 4 with the mug on the left have no data mirror (it needs the mug right of the chair)
    and are left out of the pairs; a flip needs no photo."""
    root = without_photos(dataset, tmp_path / "w", ["mug_right_of_chair.jpeg"])
    cfg = cfg_for(root, "tiny_qwen2vl", "experiment=strip_patching", "n_pairs=40")
    pairs, record = setting_mirror_pairs(cfg)
    assert record == {"mirror": "data", "n": 22, "without_data_mirror": 4, "without_boxes": 0, "usable": 18}
    assert not any(p.clean.items[0].name == "mug" and p.clean.items[1].name == "chair" for p in pairs)
    assert len({p.clean.id.rsplit("_", 2)[0] for p in pairs}) == 18 and len(pairs) == 40
    _, flipped = whatsup_mirror_pairs(load_whatsup(cfg), 4, 0, mirror="flip")
    assert flipped["usable"] == 22


def test_whatsup_last_token_pairs_share_the_reference_with_two_other_objects(tmp_path):
    dataset = write_dataset(tmp_path / "w")
    cfg = cfg_for(dataset)
    setting = Setting.from_config(cfg.setting)
    pairs = whatsup_last_token_pairs(load_composites(cfg), setting, 6, seed=0)
    assert [p.clean.direction for p in pairs] == ["left", "right"] * 3
    for pair in pairs:
        clean, cf = pair.clean, pair.counterfactual
        assert cf.items[1].name == clean.items[1].name == "chair"      # only the chair has five objects
        assert not {clean.items[0].name, clean.items[2].name} & {cf.items[0].name, cf.items[2].name}
        assert cf.direction != clean.direction and cf.prompt == setting.prompt(cf.direction, "chair")
        assert pair.ordering_answer == clean.items[2 if cf.direction == "right" else 0].answer
    few = write_dataset(tmp_path / "few", combos=[("mug", "chair"), ("cap", "chair"), ("bowl", "table")])
    with pytest.raises(UsageError, match="share a reference with four different objects"):
        whatsup_last_token_pairs(load_composites(cfg_for(few)), setting, 2, seed=0)


@pytest.mark.parametrize("experiment,figure", [("last_token", "fig02_last_token"),
                                               ("strip_patching", "fig07_strip_patching"),
                                               ("object_patching", "fig06_object_patching")])
def test_patching_figures_draw_a_whatsup_panel(dataset, tmp_path, experiment, figure):
    results = tmp_path / "results"
    for setting in ("squares", "whatsup"):
        cfg = make_cfg("model=tiny_qwen2vl", f"experiment={experiment}", f"setting={setting}", "n_pairs=2",
                       "layers=[0,3]", f"results_dir={results}", f"data.whatsup_dir={dataset}",
                       f"data.whatsup_boxes={dataset / 'boxes.json'}")
        run_unit(cfg, lambda: load_twin("tiny_qwen2vl"))
    record, arrays = load_unit(results / experiment / "tiny_qwen2vl" / "whatsup")
    assert record["metrics"]["n_pairs"] == 2 and set(arrays["orientation"]) == {"horizontal"}
    if experiment != "last_token":       # the mirror used and the composites left out, recorded
        assert record["metrics"]["whatsup_pairs"] == {"mirror": "data", "n": 26, "without_data_mirror": 0,
                                                      "without_boxes": 0, "usable": 26}
    assert run_plot(figure, "--results", str(results), "--out", str(tmp_path / "fig")) == 0
    summary = (tmp_path / "fig" / "summary.md").read_text()
    assert "| tiny_qwen2vl | squares |" in summary and "| tiny_qwen2vl | whatsup |" in summary


def no_model():
    raise AssertionError("the model was loaded before the input was refused")


@pytest.mark.parametrize("args,needle", [
    (["experiment=ablated_patching"], "does not run on setting 'whatsup'; allowed: squares, shapes, objects"),
    (["experiment=object_patching"], "data.whatsup_boxes is not set"),
    (["experiment=strip_patching", "setting.mirror=sideways"], "setting.mirror 'sideways'"),
    (["experiment=strip_patching", "setting.cuts=[0.25,0.6667]"], "side parts of 3 and 4 token columns"),
])
def test_patching_what_a_whatsup_setting_cannot_do_is_refused_in_one_line(dataset, tmp_path, args, needle):
    """In process: the run stops with a one-line UsageError (the command line prints it and exits 2) before the
    model loads, and writes nothing."""
    cfg = make_cfg("model=tiny_qwen2vl", "setting=whatsup", "n_pairs=1", f"data.whatsup_dir={dataset}",
                   f"results_dir={tmp_path / 'results'}", *args)
    with pytest.raises(UsageError) as err:
        run_unit(cfg, no_model)
    assert "\n" not in str(err.value) and needle in str(err.value), str(err.value)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("model", ["tiny_qwen2vl", "tiny_gemma3"])
def test_whatsup_accuracy_runs_on_both_twins(dataset, tmp_path, model):
    """Table 1's What'sUp column through the runner, on the stand-ins, for both real vocabularies."""
    cfg = make_cfg(f"model={model}", "experiment=accuracy", "setting=whatsup", f"data.whatsup_dir={dataset}",
                   "split=val", f"results_dir={tmp_path / 'results'}")
    record, arrays = load_unit(run_unit(cfg, lambda: load_twin(model)))
    n = 2 * len(load_splits(cfg)["val"])
    assert record["metrics"]["n"] == n and arrays["probs"].shape == (n, 61)
    assert (arrays["probs"] > 0).all() and 0 <= record["metrics"]["accuracy"] <= 1
