"""What'sUp composites on stand-in photographs written in the real layout (JSON + JPEGs) by
data_gen.whatsup.write_stand_in: a noisy grey background, the reference as one colored block in the middle and
the object as another block on its side."""

import json

import numpy as np
import pytest
from PIL import Image

from data_gen.scenes import Grid
from data_gen.settings import Setting
from data_gen.whatsup import (
    STAND_IN_COLORS,
    STAND_IN_COMBOS,
    STAND_IN_OBJECT_BOX,
    STAND_IN_REFERENCE_BOX,
    composite_samples,
    covering_token_box,
    load_composites,
    load_splits,
    pair_photos,
    read_photos,
    split_composites,
    write_stand_in,
)
from tests.conftest import SHARED_FIRST_TOKEN, load_twin, make_cfg
from vlm.cli import UsageError
from vlm.scoring import AnswerScorer

COLORS = STAND_IN_COLORS
COMBOS = list(STAND_IN_COMBOS)
OBJECT_BOX, REFERENCE_BOX = STAND_IN_OBJECT_BOX, STAND_IN_REFERENCE_BOX

# every object-reference combination of the real Controlled-A (controlled_images_dataset.json), by reference
REAL_COMBOS = {
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


def write_dataset(root, combos=COMBOS, images=True, seed=0):
    return write_stand_in(root, combos, images, seed)


def cfg_for(root, model="tiny_qwen2vl", *overrides):
    return make_cfg(f"model={model}", "setting=whatsup", f"data.whatsup_dir={root}", "setting.n_composites=null",
                    *overrides)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("whatsup"))


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
    combos = [(obj, ref) for ref, objs in REAL_COMBOS.items() for obj in objs.split()]
    assert len(combos) == 103
    root = write_dataset(tmp_path, combos, images=False)    # pairing reads names only
    assert len(pair_photos(read_photos(root))) == 31 * 30 + 45 * 44 + 27 * 26 == 3612
    composites = load_composites(cfg_for(root, "tiny_qwen2vl", "setting.n_composites=1074"))
    assert len(composites) == 1074 and len({c.id for c in composites}) == 1074


@pytest.mark.parametrize("model", [pytest.param("tiny_qwen2vl", marks=SHARED_FIRST_TOKEN), "tiny_gemma3"])
def test_whatsup_answers_start_with_distinct_tokens(model):
    setting = Setting.from_config(make_cfg("setting=whatsup").setting)
    AnswerScorer(load_twin(model).tokenizer, setting.candidates)


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
    cfg = cfg_for(dataset, model)
    grid = Grid.from_config(cfg.model.grid)
    composites = load_composites(cfg)
    assert {c.id for c in composites} == {"_".join(t) for t in expected_pairs(COMBOS)}
    for composite in composites[:4]:
        image = composite.image()
        assert image.size == (grid.width, grid.height)
        names = [composite.left.object, composite.left.reference, composite.right.object]
        for position, (item, name) in enumerate(zip(composite.items, names, strict=True)):
            assert item.position == position and item.name == name
            x0, y0, x1, y1 = item.pixel_box
            assert 0 <= x0 < x1 <= grid.width and 0 <= y0 < y1 <= grid.height
            assert inside(color_mask(image, COLORS[name.replace(" ", "-")]), item.pixel_box)
            row0, col0, row1, col1 = item.token_box
            assert 0 <= row0 < row1 <= grid.rows and 0 <= col0 < col1 <= grid.cols
            assert item.token_box == covering_token_box(grid, item.pixel_box)
            assert composite.strips[position] == (0, col0, grid.rows, col1)   # parts are full-height bands
        assert [item.token_box[1] for item in composite.items] == list(composite.columns[:3])
    if model == "tiny_qwen2vl":
        assert composites[0].columns == (0, 4, 8, 12)


def test_samples_prompt_about_the_reference_and_answer_the_queried_side(dataset):
    cfg = cfg_for(dataset)
    setting = Setting.from_config(cfg.setting)
    composite = next(c for c in load_composites(cfg) if c.id == "bottle-of-mustard_table_mug")
    left, right = composite_samples(composite, setting)
    assert (left.direction, left.answer) == ("left", "mustard")       # answer override in whatsup.yaml
    assert (right.direction, right.answer) == ("right", "mug")
    assert left.prompt == "The object on the floor to the left of the table is"
    assert right.prompt == "The object on the floor to the right of the table is"
    assert left.setting == "whatsup" and left.orientation == "horizontal" and left.image is right.image
    assert [i.answer for i in left.items] == ["mustard", "table", "mug"]


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


def test_box_file_gives_tight_boxes_and_drops_photos_outside_their_part(tmp_path):
    root = write_dataset(tmp_path / "data")
    boxes = {f"{obj}_{relation}_{ref}.jpeg": {"object": list(OBJECT_BOX[relation.removesuffix("_of")]),
                                               "reference": list(REFERENCE_BOX)}
             for obj, ref in COMBOS for relation in ("left_of", "right_of")}
    boxes["cap_left_of_chair.jpeg"]["object"] = [70, 60, 90, 90]          # over the middle part
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    cfg = cfg_for(root, "tiny_qwen2vl", f"data.whatsup_boxes={tmp_path / 'boxes.json'}")
    with pytest.warns(UserWarning, match="1 What'sUp photos left out.*cap_left_of_chair"):
        composites = load_composites(cfg)
    assert not any(c.left.object == "cap" for c in composites)
    assert len(composites) == len(expected_pairs(COMBOS)) - 2              # cap-left paired with mug, beer bottle
    grid = Grid.from_config(cfg.model.grid)
    composite = composites[0]
    image = composite.image()
    for item, strip in zip(composite.items, composite.strips, strict=True):
        x0, y0, x1, y1 = item.pixel_box
        assert (x1 - x0) * (y1 - y0) < grid.pixels_per_token**2 * grid.rows * 3    # tighter than its part
        # a tight box may lose a pixel row to the blur of resizing the photo
        assert inside(color_mask(image, COLORS[item.name.replace(" ", "-")]), item.pixel_box, margin=1)
        assert strip[1] <= item.token_box[1] and item.token_box[3] <= strip[3]


def test_whatsup_prompts_run_on_the_twins(twin, dataset, request):
    if twin.name == "tiny_qwen2vl":
        request.applymarker(SHARED_FIRST_TOKEN)
    cfg = cfg_for(dataset, twin.name)
    setting = Setting.from_config(cfg.setting)
    samples = composite_samples(load_composites(cfg)[0], setting)
    inputs = twin.encode([s.image for s in samples], [s.prompt for s in samples])
    logits = twin.last_logits(inputs)
    probabilities = AnswerScorer(twin.tokenizer, setting.candidates).probabilities(logits)
    assert probabilities.shape == (2, len(setting.candidates)) and bool(probabilities.isfinite().all())
