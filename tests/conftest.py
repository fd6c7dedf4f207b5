"""Shared fixtures: configs composed exactly as the command line composes them, and the two tiny twins
loaded once per test session."""

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from common.cli import CONFIG_DIR
from organisms.train import evaluate

TWINS = ["tiny_qwen2vl", "tiny_gemma3"]

def make_cfg(*overrides: str, config_name: str = "config"):
    """The config `python -m ... <overrides>` would see."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=["device=cpu", *overrides])


def reproduced_card(config_name: str) -> dict:
    """The held-out report that `python -m organisms.train --config-name <config_name> evaluate=true` prints, after
    checking that it equals the shipped `card.json` (every setting's n, accuracy and per-direction accuracy)."""
    cfg = make_cfg(config_name=config_name)
    card = json.loads((Path(cfg.out) / "card.json").read_text())
    report = evaluate(cfg)
    assert set(report) == set(card["held_out"]) == {"squares", "shapes", "objects"}
    for name, numbers in card["held_out"].items():
        assert report[name]["n"] == numbers["n"]
        assert report[name]["accuracy"] == pytest.approx(numbers["accuracy"])
        assert report[name]["by_direction"] == pytest.approx(numbers["by_direction"])
    return report


@pytest.fixture(scope="session", autouse=True)
def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


_loaded = {}


def load_twin(name: str):
    from vlm.models import load_model

    if name not in _loaded:
        _loaded[name] = load_model(make_cfg(f"model={name}"))
    return _loaded[name]


@pytest.fixture(params=TWINS)
def twin(request):
    """Each tiny twin in turn (loaded once per session, built into .cache/twins on first use)."""
    return load_twin(request.param)
