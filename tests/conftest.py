"""Shared fixtures: configs composed exactly as the command line composes them, and the two tiny twins
loaded once per test session."""

import os

import pytest
from hydra import compose, initialize_config_dir

from vlm.cli import CONFIG_DIR, UsageError

TWINS = ["tiny_qwen2vl", "tiny_gemma3"]

# MARKED until multi-token answer scoring: on Qwen2-VL's real vocabulary (the tiny_qwen2vl twin) nine first tokens
# are shared between What'sUp answers: `Ban` (Banana, Banjo), `b` (bottle, bowl), `B` (Bottle, Bowl, Bread), `g`/`G`
# (glasses, glove), `L` (Lamp, Laptop, Lemon), `s` (soda can, sunglasses), `S` (Soda can, Spatula, Sunglasses),
# `Sc` (Scarf, Scissors), which first-token scoring (vlm.scoring.AnswerScorer) refuses with a UsageError. strict:
# once scoring handles them these tests pass, and the mark must go. On Gemma 3's vocabulary no first token is shared.
SHARED_FIRST_TOKEN = pytest.mark.xfail(raises=UsageError, strict=True, reason=(
    "What'sUp answers share first tokens on Qwen2-VL's vocabulary; first-token scoring refuses them"))


def make_cfg(*overrides: str, config_name: str = "config"):
    """The config `python -m ... <overrides>` would see."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=["device=cpu", *overrides])


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
