"""Fixtures shared by every test file (helpers they import live in tests/helpers.py): offline hub access, each
tiny twin in turn (loaded once per session), and the What'sUp stand-in directory (written once per session)."""

import os

import pytest

from tests.helpers import TWINS, load_twin, stand_in_dir


@pytest.fixture(scope="session", autouse=True)
def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(params=TWINS)
def twin(request):
    """Each tiny twin in turn (loaded once per session, built into .cache/twins on first use)."""
    return load_twin(request.param)


@pytest.fixture(scope="session")
def stand_in(tmp_path_factory):
    """The What'sUp stand-in directory with its known boxes (tests/helpers.py, `stand_in_dir`): do not change it."""
    return stand_in_dir(tmp_path_factory)
