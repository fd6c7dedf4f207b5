"""data_gen on both model geometries (Qwen2-VL 12 x 12 tokens of 28 px, Gemma 3 16 x 16 of 56 px): token
boxes, strips, pixel alignment of what is drawn, prompts and answers, determinism, pairs, the render command."""

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from common.cli import CONFIG_DIR
from common.errors import UsageError
from common.geometry import (
    Grid,
    Layout,
    LayoutError,
    box_contains,
    grid_boxes,
    line_boxes,
    pixel_box,
    strip_box,
    token_indices,
)
from data_gen.pairs import (
    ablation_sources,
    empty_image,
    isolated_middle_image,
    last_token_pairs,
    mirror_pairs,
    random_shape_grids,
    shape_grid,
)
from data_gen.render import draw_scene, glyph_image, random_samples
from data_gen.render import main as render_main
from data_gen.settings import DIRECTIONS, PREPOSITIONS, Setting
from tests.helpers import run_command

REPO = Path(__file__).resolve().parent.parent
MODELS = {"qwen2vl_7b": (336, 12, 28), "gemma3_4b": (896, 16, 56)}   # image side, tokens per side, px per token
SETTINGS = ("squares", "shapes", "objects")
GREY_GLYPHS = {"bomb"}      # OpenMoji draws the bomb in greys and black only


def geometry(model: str) -> tuple[Grid, Layout]:
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{model}.yaml")
    return Grid(**cfg.grid), Layout(**cfg.layout)


def load_setting(name: str) -> Setting:
    return Setting.from_config(OmegaConf.load(Path(CONFIG_DIR) / "setting" / f"{name}.yaml"))


def foreground(image, background=(255, 255, 255)) -> np.ndarray:
    """(height, width) bool: pixels that differ from the background."""
    return (np.asarray(image) != np.array(background, dtype=np.uint8)).any(-1)


def box_mask(shape, boxes) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


# --- geometry ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_grid_matches_native_resolution(model):
    side, tokens, ppt = MODELS[model]
    grid, _ = geometry(model)
    assert (grid.rows, grid.cols, grid.pixels_per_token) == (tokens, tokens, ppt)
    assert (grid.width, grid.height) == (side, side)
    sample = random_samples(load_setting("squares"), *geometry(model), 1, 0)[0]
    assert sample.image.size == (side, side) and sample.image.mode == "RGB"


def test_line_boxes_match_paper_table6():
    qwen, gemma = geometry("qwen2vl_7b"), geometry("gemma3_4b")
    assert line_boxes(*qwen, "horizontal") == [(5, 1, 7, 3), (5, 5, 7, 7), (5, 9, 7, 11)]
    assert line_boxes(*gemma, "horizontal") == [(6, 0, 9, 3), (6, 6, 9, 9), (6, 12, 9, 15)]


@pytest.mark.parametrize("model", MODELS)
def test_vertical_is_the_transpose_of_horizontal(model):
    grid, layout = geometry(model)
    transpose = [(c0, r0, c1, r1) for r0, c0, r1, c1 in line_boxes(grid, layout, "horizontal")]
    assert line_boxes(grid, layout, "vertical") == transpose
    setting = load_setting("squares")
    horizontal = draw_scene(setting, grid, layout, "horizontal", ["red", "green", "blue"], "left")
    vertical = draw_scene(setting, grid, layout, "vertical", ["red", "green", "blue"], "above")
    assert np.array_equal(np.asarray(vertical.image), np.asarray(horizontal.image).transpose(1, 0, 2))
    assert [s[:2] for s in vertical.strips] == [s[1::-1] for s in horizontal.strips]


def test_offset_shifts_by_whole_tokens():
    grid, layout = geometry("qwen2vl_7b")
    shifted = line_boxes(grid, layout, "horizontal", offset=(-3, 1))
    assert shifted == [(r0 - 3, c0 + 1, r1 - 3, c1 + 1) for r0, c0, r1, c1 in line_boxes(grid, layout, "horizontal")]


def test_qwen_strips_tile_the_grid_and_contain_their_items():
    grid, layout = geometry("qwen2vl_7b")
    boxes = line_boxes(grid, layout, "horizontal")
    strips = [strip_box(grid, layout, box, "horizontal") for box in boxes]
    assert strips == [(0, 0, 12, 4), (0, 4, 12, 8), (0, 8, 12, 12)]
    assert sorted(k for s in strips for k in token_indices(grid, s)) == list(range(grid.n_tokens))
    assert all(box_contains(s, b) for s, b in zip(strips, boxes, strict=True))
    vertical = [strip_box(grid, layout, box, "vertical") for box in line_boxes(grid, layout, "vertical")]
    assert vertical == [(0, 0, 4, 12), (4, 0, 8, 12), (8, 0, 12, 12)]


def test_gemma_strips_are_the_items_columns():
    grid, layout = geometry("gemma3_4b")
    for box in line_boxes(grid, layout, "horizontal"):
        strip = strip_box(grid, layout, box, "horizontal")
        assert strip == (0, box[1], 16, box[3]) and box_contains(strip, box)


@pytest.mark.parametrize("model", MODELS)
def test_pixel_box_and_token_indices_follow_the_token_grid(model):
    grid, layout = geometry(model)
    p = grid.pixels_per_token
    for orientation in ("horizontal", "vertical"):
        for r0, c0, r1, c1 in line_boxes(grid, layout, orientation):
            assert pixel_box(grid, (r0, c0, r1, c1)) == (c0 * p, r0 * p, c1 * p, r1 * p)
            indices = token_indices(grid, (r0, c0, r1, c1))
            assert indices == sorted(k for k in range(grid.n_tokens)
                                     if r0 <= k // grid.cols < r1 and c0 <= k % grid.cols < c1)
    # Qwen's left item covers rows 5-6, cols 1-2: tokens 5*12+1, 5*12+2, 6*12+1, 6*12+2
    if model == "qwen2vl_7b":
        assert token_indices(grid, line_boxes(grid, layout, "horizontal")[0]) == [61, 62, 73, 74]


@pytest.mark.parametrize("model", MODELS)
def test_grid_boxes_keep_item_size_and_gap(model):
    grid, layout = geometry(model)
    size, step = layout.item_tokens, layout.item_tokens + layout.gap_tokens
    for n in (2, 3):
        boxes = grid_boxes(grid, layout, n)
        assert len(boxes) == n and all(len(row) == n for row in boxes)
        for r in range(n):
            for c in range(n):
                r0, c0, r1, c1 = boxes[r][c]
                assert (r1 - r0, c1 - c0) == (size, size)
                assert (r0, c0) == (boxes[0][0][0] + r * step, boxes[0][0][1] + c * step)
        r0, c0, r1, c1 = boxes[0][0][:2] + boxes[-1][-1][2:]
        assert abs(r0 - (grid.rows - r1)) <= 1 and abs(c0 - (grid.cols - c1)) <= 1    # centred


def test_layouts_that_do_not_fit_raise_one_line_layout_errors():
    grid, _ = geometry("qwen2vl_7b")
    cases = [
        lambda: line_boxes(grid, Layout(5, 2, 4), "horizontal"),             # 3 * 5 + 2 * 2 = 19 > 12
        lambda: line_boxes(grid, Layout(2, 2, 4), "vertical", offset=(0, 6)),  # pushed off the right edge
        lambda: strip_box(grid, Layout(2, 2, 4), (5, 0, 7, 2), "horizontal"),  # strip from col -1
        lambda: grid_boxes(grid, Layout(2, 2, 4), 4),                         # 4 * 2 + 3 * 2 = 14 > 12
    ]
    for case in cases:
        with pytest.raises(LayoutError) as err:
            case()
        assert isinstance(err.value, UsageError) and isinstance(err.value, ValueError)
        assert "\n" not in str(err.value) and "12" in str(err.value)
    with pytest.raises(LayoutError, match="19"):
        line_boxes(grid, Layout(5, 2, 4), "horizontal")
    with pytest.raises(LayoutError):
        Layout(0, 2, 4)


# --- drawing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("setting_name", SETTINGS)
def test_items_are_drawn_inside_their_boxes_only(model, setting_name):
    grid, layout = geometry(model)
    setting = load_setting(setting_name)
    for sample in random_samples(setting, grid, layout, 4, seed=3):
        drawn = foreground(sample.image, setting.background)
        boxes = [item.pixel_box for item in sample.items]
        assert not (drawn & ~box_mask(drawn.shape, boxes)).any(), "pixels drawn outside the item boxes"
        for item in sample.items:
            x0, y0, x1, y1 = item.pixel_box
            assert item.pixel_box == pixel_box(grid, item.token_box)
            coverage = drawn[y0:y1, x0:x1].mean()
            assert coverage > 0.2, f"{item.name} covers {coverage:.2f} of its box"
            if setting_name == "squares":     # squares fill their box exactly, in their own color
                block = np.asarray(sample.image)[y0:y1, x0:x1]
                assert (block == np.array(setting.item(item.name).rgb, dtype=np.uint8)).all()
        if setting_name == "squares":
            assert np.array_equal(drawn, box_mask(drawn.shape, boxes))


def test_glyphs_render_in_color_and_differ():
    setting = load_setting("objects")
    grid, layout = geometry("qwen2vl_7b")
    assert len(setting.items) == 8
    tiles = {}
    for item in setting.items:
        rgba = np.asarray(glyph_image(item.glyph))
        opaque = rgba[rgba[..., 3] == 255][:, :3]
        # a glyph drawn as a one-color mask would have a single color where it is fully opaque
        colors, counts = np.unique(opaque // 32, axis=0, return_counts=True)
        assert (counts > 0.01 * len(opaque)).sum() >= 2, f"{item.name} is drawn in one color"
        rgb = opaque.astype(int)
        saturated = (rgb.max(-1) - rgb.min(-1) > 80).mean()
        if item.name not in GREY_GLYPHS:
            assert saturated > 0.05, f"{item.name} has no hue ({saturated:.3f} of pixels saturated)"
        sample = isolated_middle_image(setting, grid, layout, "horizontal", item.name)
        x0, y0, x1, y1 = sample.items[0].pixel_box
        tiles[item.name] = np.asarray(sample.image, dtype=float)[y0:y1, x0:x1]
    for a, b in combinations(tiles, 2):
        assert np.abs(tiles[a] - tiles[b]).mean() > 5, f"{a} and {b} look the same"


# --- prompts and answers -------------------------------------------------------------------------------

def test_prompts_use_the_paper_templates():
    squares, shapes, objects = (load_setting(name) for name in SETTINGS)
    assert squares.prompt("left", "green") == "The color of the square to the left of the green square is"
    assert shapes.prompt("above", shapes.item("green circle")) == "The color of the shape above the green is"
    assert objects.prompt("below", "apple") == "The object below the apple is"
    assert objects.prompt("right", "key") == "The object to the right of the key is"
    assert squares.candidates == ["red", "green", "blue", "black", "brown", "gray"]
    assert shapes.candidates == squares.candidates
    assert objects.candidates == ["orange", "apple", "pot", "bell", "hat", "rose", "key", "bomb"]


@pytest.mark.parametrize("setting_name", SETTINGS)
def test_answers_follow_the_queried_direction(setting_name):
    setting = load_setting(setting_name)
    grid, layout = geometry("qwen2vl_7b")
    samples = random_samples(setting, grid, layout, 16, seed=1)
    for sample in samples:
        first, middle, last = sample.items
        assert [i.position for i in sample.items] == [0, 1, 2]
        assert len({i.name for i in sample.items}) == 3
        assert sample.answer == (first if sample.direction in ("left", "above") else last).answer
        assert sample.direction in (("left", "right") if sample.orientation == "horizontal" else ("above", "below"))
        assert PREPOSITIONS[sample.direction] in sample.prompt
        assert sample.prompt == setting.prompt(sample.direction, middle.name)
        assert f" {middle.answer} " in sample.prompt
    combos = [(s.orientation, s.direction) for s in samples]
    assert {c: combos.count(c) for c in combos} == {("horizontal", "left"): 4, ("horizontal", "right"): 4,
                                                    ("vertical", "above"): 4, ("vertical", "below"): 4}


def test_samples_are_deterministic_from_the_seed():
    setting = load_setting("shapes")
    grid, layout = geometry("gemma3_4b")
    first, again, other = (random_samples(setting, grid, layout, 6, seed) for seed in (7, 7, 8))
    assert [s.to_json() for s in first] == [s.to_json() for s in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again, strict=True))
    assert [s.to_json() for s in first] != [s.to_json() for s in other]
    json.dumps([s.to_json() for s in first])    # serializable, no image inside
    assert "image" not in first[0].to_json()


def test_malformed_setting_configs_raise_usage_errors():
    good = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "setting" / "shapes.yaml"))
    broken = [
        {k: v for k, v in good.items() if k != "prompt"},
        {**good, "prompt": "The color of the shape is"},
        {**good, "items": good["items"][:2]},
        {**good, "items": [{**good["items"][0], "shape": "hexagon"}, *good["items"][1:]]},
        {**good, "items": [{"name": "x", "answer": "x", "rgb": [1, 2, 3]}, *good["items"]]},
        {**good, "items": [{"name": "x", "answer": "x", "glyph": "1F34A"}, *good["items"]]},
        {**good, "items": [{**good["items"][0], "rgb": [300, 0, 0]}, *good["items"][1:]]},
    ]
    for cfg in broken:
        with pytest.raises(UsageError) as err:
            Setting.from_config(OmegaConf.create(cfg))
        assert "\n" not in str(err.value) and "'shapes'" in str(err.value)
    with pytest.raises(UsageError, match="allowed"):
        Setting.from_config(OmegaConf.create(good)).item("purple moon")


# --- pairs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting_name", SETTINGS)
def test_last_token_pairs_share_the_reference_as_in_fig_3(setting_name):
    """Clean (a, m, b) towards a; counterfactual (c, m, e) with the clean's reference m, two other side items,
    queried the opposite way; balanced over orientation and direction."""
    setting = load_setting(setting_name)
    grid, layout = geometry("qwen2vl_7b")
    pairs = last_token_pairs(setting, grid, layout, 8, seed=0)
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for pair in pairs:
        clean, cf = pair.clean, pair.counterfactual
        assert cf.items[1].name == clean.items[1].name                       # the shared reference m
        assert not {clean.items[0].name, clean.items[2].name} & {cf.items[0].name, cf.items[2].name}
        assert len({i.name for i in clean.items + cf.items}) == 5
        assert cf.orientation == clean.orientation and cf.direction == opposite[clean.direction]
        target = 0 if cf.direction in ("left", "above") else 2
        assert pair.clean_answer == clean.answer and pair.value_answer == cf.answer
        assert pair.ordering_answer == clean.items[target].answer
        assert len({pair.clean_answer, pair.ordering_answer, pair.value_answer}) == 3
        assert cf.prompt == setting.prompt(cf.direction, clean.items[1].name)
    assert sorted(p.clean.direction for p in pairs) == sorted(DIRECTIONS * 2)
    again = last_token_pairs(setting, grid, layout, 8, seed=0)
    assert [p.targets for p in pairs] == [p.targets for p in again]


def test_last_token_pairs_all_distinct_option():
    setting = load_setting("squares")
    grid, layout = geometry("gemma3_4b")
    for pair in last_token_pairs(setting, grid, layout, 4, seed=1, counterfactual="all_distinct"):
        assert not {i.name for i in pair.clean.items} & {i.name for i in pair.counterfactual.items}
    with pytest.raises(UsageError, match="sideways"):
        last_token_pairs(setting, grid, layout, 4, seed=1, counterfactual="sideways")


def test_mirror_pairs_swap_the_side_items():
    setting = load_setting("objects")
    grid, layout = geometry("gemma3_4b")
    for pair in mirror_pairs(setting, grid, layout, 8, seed=2):
        clean, mirror = pair.clean, pair.counterfactual
        assert [i.name for i in mirror.items] == [i.name for i in reversed(clean.items)]
        assert [i.token_box for i in mirror.items] == [i.token_box for i in clean.items]
        assert mirror.direction == clean.direction and mirror.prompt == clean.prompt
        assert pair.clean_answer == clean.answer and pair.swapped_answer == mirror.answer
        assert pair.swapped_answer != pair.clean_answer
        other_side = clean.items[2] if clean.direction in ("left", "above") else clean.items[0]
        assert pair.swapped_answer == other_side.answer


def test_builders_name_the_setting_when_it_has_too_few_items():
    four = OmegaConf.load(Path(CONFIG_DIR) / "setting" / "squares.yaml")
    four.items = four["items"][:4]
    setting = Setting.from_config(four)
    with pytest.raises(UsageError, match=r"5 distinct items, setting 'squares' has 4"):
        last_token_pairs(setting, *geometry("qwen2vl_7b"), 2, seed=0)
    five = OmegaConf.load(Path(CONFIG_DIR) / "setting" / "squares.yaml")
    five.items = five["items"][:5]
    with pytest.raises(UsageError, match=r"6 distinct items, setting 'squares' has 5"):
        last_token_pairs(Setting.from_config(five), *geometry("qwen2vl_7b"), 2, seed=0, counterfactual="all_distinct")


@pytest.mark.parametrize("model", MODELS)
def test_ablation_sources(model):
    setting = load_setting("shapes")
    grid, layout = geometry(model)
    sample = random_samples(setting, grid, layout, 3, seed=0)[2]      # a vertical one
    sources = ablation_sources(sample, setting, grid, layout)
    middle = line_boxes(grid, layout, sample.orientation)[1]
    assert [s.items[0].name for s in sources.isolated] == [i.name for i in sample.items]
    for isolated, item in zip(sources.isolated, sample.items, strict=True):
        assert isolated.items[0].token_box == middle and isolated.items[0].position == 1
        drawn = foreground(isolated.image)
        assert drawn.any() and not (drawn & ~box_mask(drawn.shape, [pixel_box(grid, middle)])).any()
        # the isolated item is the same drawing as in the sample, moved to the middle box
        x0, y0, x1, y1 = item.pixel_box
        mx0, my0, mx1, my1 = isolated.items[0].pixel_box
        assert np.array_equal(np.asarray(sample.image)[y0:y1, x0:x1], np.asarray(isolated.image)[my0:my1, mx0:mx1])
    assert sources.empty.size == (grid.width, grid.height) and not foreground(sources.empty).any()
    assert not foreground(empty_image(grid)).any()


@pytest.mark.parametrize("model", MODELS)
def test_shape_grids(model):
    setting = load_setting("shapes")
    grid, layout = geometry(model)
    names = setting.item_names[:4]
    sample = shape_grid(setting, grid, layout, 2, names)
    assert sample.orientation == "grid" and sample.strips == [] and sample.direction is None
    assert [i.position for i in sample.items] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert [i.name for i in sample.items] == names
    for sample in random_shape_grids(setting, grid, layout, 3, 3, seed=0):
        assert len(sample.items) == 9
        boxes = grid_boxes(grid, layout, 3)
        assert [i.token_box for i in sample.items] == [b for row in boxes for b in row]
        drawn = foreground(sample.image)
        assert not (drawn & ~box_mask(drawn.shape, [i.pixel_box for i in sample.items])).any()
    two = random_shape_grids(setting, grid, layout, 2, 5, seed=0)
    assert all(len({i.name for i in s.items}) == 4 for s in two)
    with pytest.raises(UsageError):
        shape_grid(setting, grid, layout, 2, names[:3])


# --- the render command --------------------------------------------------------------------------------

def render(*args: str):
    """`python -m data_gen.render ARGS`, in this process."""
    return run_command(render_main, *args)


def test_render_command_writes_images_samples_and_contact_sheet(tmp_path):
    out = tmp_path / "squares"
    result = render("setting=squares", "model=gemma3_4b", "n=5", f"out={out}")
    assert result.returncode == 0, result.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 6 and "contact_sheet.png" in pngs
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 5
    from PIL import Image

    for line in lines:
        record = json.loads(line)
        assert set(record) == {"id", "setting", "orientation", "items", "strips", "direction", "prompt", "answer",
                               "image_file"}
        with Image.open(out / record["image_file"]) as image:
            assert image.size == (896, 896)
            drawn = foreground(image.convert("RGB"))
        assert np.array_equal(drawn, box_mask(drawn.shape, [i["pixel_box"] for i in record["items"]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["squares"]      # no temporary directory left
    # a second run replaces the previous render whole
    assert render("setting=objects", "n=2", f"out={out}").returncode == 0
    assert len(list(out.glob("*.png"))) == 3 and len((out / "samples.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["squares"]


@pytest.mark.parametrize("args, message", [
    (("setting=no_such_setting",), "no_such_setting"),
    (("model.layout.item_tokens=5",), "error: 3 items of 5 tokens"),
    (("model.layout.strip_tokens=13",), "error: "),
])
def test_render_command_fails_cleanly(tmp_path, args, message):
    out = tmp_path / "out"
    result = render(*args, f"out={out}")
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 15
    assert list(tmp_path.iterdir()) == []


def test_render_command_needs_out_and_keeps_foreign_directories(tmp_path):
    result = render("n=2")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: out=DIR is required: the directory to write the images, samples.jsonl and contact_sheet.png into"]
    (tmp_path / "notes.txt").write_text("mine")
    result = render("n=2", f"out={tmp_path}")
    assert result.returncode == 2 and "exists" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
