"""The organism's training script: its data split and a two-step run that saves a model the loader reads
back through from_pretrained (the organism's own scientific behaviour is pinned once its weights ship)."""

import json

from data_gen.scenes import Grid, Layout
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
                   f"out={out}", config_name="organism")
    card = train(cfg)
    assert card["steps"] == 2 and set(card["held_out"]) == {"squares"}
    assert json.loads((out / "card.json").read_text())["held_out"]["squares"]["n"] == 96
    vlm = load_model(make_cfg("model=organism", f"model.path={out}"))
    assert (vlm.grid.rows, vlm.grid.cols) == (12, 12) and vlm.n_layers == 4
    assert not (tmp_path / "organism.tmp").exists()
