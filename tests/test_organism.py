"""The organism's training script: its data split and a two-step run that saves a model the loader reads
back through from_pretrained (the organism's own scientific behaviour is pinned once its weights ship)."""

import json

from data_gen.scenes import Grid, Layout, line_boxes, line_offsets, strip_box
from data_gen.settings import Setting
from tests.conftest import make_cfg
from vlm.models import load_model
from vlm.organism import question_splits, train


def test_held_out_triples_never_appear_in_training():
    cfg = make_cfg("setting=squares")
    setting = Setting.from_config(cfg.setting)
    grid, layout = Grid(12, 12, 28), Layout(2, 2, 4)
    train_set, test_set = question_splits(setting, grid, layout, 0.2, seed=0)
    triple = lambda s: tuple(item.name for item in s.items)  # noqa: E731
    assert len(train_set) + len(test_set) == 6 * 5 * 4 * 4          # ordered triples x 2 orientations x 2 directions
    assert len(test_set) == 24 * 4
    assert not {triple(s) for s in train_set} & {triple(s) for s in test_set}
    assert {s.direction for s in test_set} == {"left", "right", "above", "below"}
    again, _ = question_splits(setting, grid, layout, 0.2, seed=0)
    assert [s.id for s in again] == [s.id for s in train_set]


def test_a_short_run_saves_a_loadable_model_with_its_card(tmp_path):
    out = tmp_path / "organism"
    cfg = make_cfg("train.steps=2", "train.batch_size=4", "train.eval_every=2", "train.settings=[squares]",
                   "train.offsets=true", f"out={out}", config_name="organism")
    card = train(cfg)
    assert card["steps"] == 2 and set(card["held_out"]) == {"squares"}
    assert json.loads((out / "card.json").read_text())["held_out"]["squares"]["n"] == 96
    vlm = load_model(make_cfg("model=organism", f"model.path={out}"))
    assert (vlm.grid.rows, vlm.grid.cols) == (12, 12) and vlm.n_layers == 4
    assert not (tmp_path / "organism.tmp").exists()


def test_line_offsets_are_every_shift_that_fits():
    grid, layout = Grid(12, 12, 28), Layout(2, 2, 4)
    shifts = line_offsets(grid, layout, "horizontal")
    assert (0, 0) in shifts
    # items at cols [1,3) [5,7) [9,11) with strips [0,4) [4,8) [8,12): the strips pin the columns, rows move freely
    assert {d_col for _, d_col in shifts} == {0} and {d_row for d_row, _ in shifts} == set(range(-5, 6))
    for offset in shifts:                      # these raise when a shift leaves the grid
        boxes = line_boxes(grid, layout, "horizontal", offset=offset)
        [strip_box(grid, layout, box, "horizontal") for box in boxes]
    vertical = line_offsets(grid, layout, "vertical")
    assert {d_row for d_row, _ in vertical} == {0} and len(vertical) == 11
