"""Checks of config values before anything runs: each raises a one-line UsageError naming the key, the value and
what is allowed. `check_values` applies the checks of the keys every experiment shares (sizes, batch size, seed,
layers against the model's depth from its config, orientations) to whichever of them a config has; an
experiment's own `check(cfg)` adds the rest."""

import math
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.errors import UsageError

ORIENTATIONS = ("horizontal", "vertical")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(key: str, value, minimum: int = 1, allow_none: bool = False) -> None:
    """`value` is an integer >= minimum (or None where allowed)."""
    if value is None and allow_none:
        return
    if not is_int(value) or value < minimum:
        null = " or null" if allow_none else ""
        raise UsageError(f"{key}={_show(value)}: expected an integer >= {minimum}{null}")


def check_number(key: str, value, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or \
            (positive and value <= 0):
        raise UsageError(f"{key}={_show(value)}: expected a {'positive ' if positive else ''}number")


def check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{key}={_show(value)}: expected true or false")


def _show(value) -> str:
    """A value as the command line writes it: lists as [a,b], a lone string quoted."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, list):
        return "[" + ",".join(v if isinstance(v, str) else _show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value).replace(" ", "")


def model_depth(cfg: DictConfig) -> int:
    """The LM's number of layers, from the model config (`model.architecture.text_config.num_hidden_layers`),
    so that layers are checked before any weights load; the loaded model is checked against it (runner)."""
    depth = OmegaConf.select(cfg, "model.architecture.text_config.num_hidden_layers", default=None)
    if not is_int(depth) or depth < 1:
        raise UsageError(f"model {cfg.model.name}: its config lacks model.architecture.text_config."
                         f"num_hidden_layers (the LM's depth, checked against the checkpoint when it loads)")
    return depth


def check_layers(layers, depth: int, model: str) -> list[int]:
    """`layers` (`all` or a non-empty list of distinct integers in [0, depth)) as a list."""
    if layers in (None, "all"):
        return list(range(depth))
    if OmegaConf.is_list(layers):
        layers = OmegaConf.to_container(layers)
    if not isinstance(layers, list) or not layers:
        raise UsageError(f"layers={_show(layers)}: give all or a non-empty list, e.g. layers=[0,3]")
    for layer in layers:
        if not is_int(layer):
            raise UsageError(f"layers={_show(layers)}: {_show(layer)} is not an integer layer")
        if not 0 <= layer < depth:
            raise UsageError(f"layer {layer} is out of range for {model}: allowed 0..{depth - 1}")
    if len(set(layers)) != len(layers):
        raise UsageError(f"layers={_show(layers)} lists a layer twice")
    return layers


def check_orientations(value) -> None:
    values = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    if not isinstance(values, list) or not values or any(v not in ORIENTATIONS for v in values):
        raise UsageError(f"orientations={_show(value)}: give a non-empty list of {', '.join(ORIENTATIONS)}")


# key -> check of its value, for every key experiments share (applied where a config has the key)
SHARED = {
    "seed": lambda v: check_int("seed", v, minimum=0),
    "n": lambda v: check_int("n", v),
    "n_pairs": lambda v: check_int("n_pairs", v),
    "n_train": lambda v: check_int("n_train", v, allow_none=True),
    "n_test": lambda v: check_int("n_test", v, allow_none=True),
    "batch_size": lambda v: check_int("batch_size", v),
    "threads": lambda v: check_int("threads", v, allow_none=True),
    "rounds": lambda v: check_int("rounds", v),
    "redo": lambda v: check_bool("redo", v),
    "orientations": check_orientations,
}


def check_values(cfg: DictConfig) -> None:
    """The shared checks (SHARED, and `layers` against the model's depth) for the keys `cfg` has."""
    for key, check in SHARED.items():
        if key in cfg:
            check(cfg[key])
    if "layers" in cfg:
        check_layers(cfg.layers, model_depth(cfg), cfg.model.name)


def check_writable(directory: Path, what: str) -> None:
    """UsageError (starting with `what`, e.g. "results_dir=DIR") unless `directory` can be created (or exists as
    a directory) and written, tried with a temporary file in its nearest existing ancestor, removed at once:
    nothing stays behind."""
    directory = Path(directory).expanduser()
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"{what}: cannot write into {existing} ({os.strerror(err.errno or 0)})") from err
