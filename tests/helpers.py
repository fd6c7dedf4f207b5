"""What the tests share (imported by them; tests/conftest.py holds the pytest fixtures): configs composed exactly
as the command line composes them, models loaded once per test session, the shipped organisms' card check, and
the What'sUp stand-in written once per session.

The What'sUp stand-in: one directory per session (`stand_in_dir`, the session fixture `stand_in`), the config that
reads it (`whatsup_cfg`), and a copy without some photos (`without_photos`). A test must not change the shared
directory; one that changes photos or boxes writes its own (`write_stand_in`, `without_photos`).
"""

import contextlib
import importlib.util
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from common.cli import CONFIG_DIR, REPO_DIR, plot_main
from data_gen.whatsup import SUBSETS, write_stand_in

TWINS = ["tiny_qwen2vl", "tiny_gemma3"]


def make_cfg(*overrides: str, config_name: str = "config"):
    """The config `python -m ... <overrides>` would see."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=["device=cpu", *overrides])


@dataclass
class Completed:
    """What a command run in this process gave: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_command(main, *argv: str) -> Completed:
    """A command's `main(argv)` (common.cli) run in this process, as `python -m <command> ARGS` would run it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return Completed(code, out.getvalue(), err.getvalue())


def run_plot(figure: str, *argv: str) -> int:
    """`python figures/<figure>/plot.py ARGS`, in this process: its exit code (its output on stdout / stderr)."""
    path = REPO_DIR / "figures" / figure / "plot.py"
    spec = importlib.util.spec_from_file_location(f"plot_{figure}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return plot_main(module.draw, module.__doc__, str(path), list(argv))


_loaded = {}


def load_twin(name: str):
    """Model config `name` (a twin, an organism) loaded on the CPU, once per test session."""
    from vlm.models import load_model

    if name not in _loaded:
        _loaded[name] = load_model(make_cfg(f"model={name}"))
    return _loaded[name]


def reproduced_card(config_name: str) -> dict:
    """The held-out report that `python -m organisms.train --config-name <config_name> evaluate=true` prints, after
    checking that it equals the shipped `card.json` (every setting's n, accuracy and per-direction accuracy)."""
    from organisms.train import evaluate

    cfg = make_cfg(config_name=config_name)
    card = json.loads((Path(cfg.out) / "card.json").read_text())
    report = evaluate(cfg)
    assert set(report) == set(card["held_out"]) == {"squares", "shapes", "objects"}
    for name, numbers in card["held_out"].items():
        assert report[name]["n"] == numbers["n"]
        assert report[name]["accuracy"] == pytest.approx(numbers["accuracy"])
        assert report[name]["by_direction"] == pytest.approx(numbers["by_direction"])
    return report


_written: dict[str, Path] = {}


def stand_in_dir(tmp_path_factory) -> Path:
    """The stand-in What'sUp directory (data_gen.whatsup.write_stand_in: 8 object-reference combinations, each
    photographed left of, right of, on and under its reference, and their known boxes in boxes.json), written on
    the first call of the session and shared after it."""
    if "root" not in _written:
        _written["root"] = write_stand_in(tmp_path_factory.mktemp("whatsup_stand_in") / "data")
    return _written["root"]


# tiny sizes per experiment, for running every experiment config end to end (What'sUp ones on the stand-in)
TINY_SIZES = {
    "accuracy": ["setting=squares", "n=4"],
    "last_token": ["setting=squares", "n_pairs=1", "layers=[0,3]"],
    "object_patching": ["setting=shapes", "n_pairs=1", "layers=[1]"],
    "strip_patching": ["setting=objects", "n_pairs=1", "layers=[1]"],
    "ablated_patching": ["setting=squares", "n_pairs=1", "layers=[2]"],
    "ablation": ["setting=squares", "n=4"],
    "probes": ["setting=squares", "n_train=2", "n_test=1"],
    "grid_probes": ["n_train=2", "n_test=1", "grid_sizes=[2]", "grid_targets=[cell]"],
    "whatsup_probes": ["n_train=2", "n_test=2", "{boxes}"],
    "amplification": ["alphas=[1]", "random_seeds=[0]", "scalingvis.coefficients=[2.0]", "adaptvis.thresholds=[0.5]",
                      "n_train=2", "{boxes}"],
    "benchmark": ["setting=squares", "n_pairs=1", "layers=[0]"],
}


def tiny_overrides(experiment: str, stand_in, sizes: dict = TINY_SIZES) -> list[str]:
    """`sizes[experiment]` with the stand-in What'sUp directory and its box file filled in."""
    boxes = f"data.whatsup_boxes={Path(stand_in) / 'boxes.json'}"
    return [f"data.whatsup_dir={stand_in}", *(a.format(boxes=boxes) for a in sizes[experiment])]


def whatsup_cfg(root, model: str = "tiny_qwen2vl", *overrides: str, boxes: bool = False):
    """The config of setting=whatsup on `root` with every pair as a composite (n_composites null), and the box file
    `root`/boxes.json when `boxes`."""
    extra = [f"data.whatsup_boxes={Path(root) / 'boxes.json'}"] if boxes else []
    return make_cfg(f"model={model}", "setting=whatsup", f"data.whatsup_dir={root}", "setting.n_composites=null",
                    *extra, *overrides)


def without_photos(source, destination, names) -> Path:
    """A copy of the What'sUp directory `source` at `destination` without the photos `names` (file names): gone
    from the annotation file, the photo folder and the box file."""
    destination = Path(shutil.copytree(source, destination))
    annotation = destination / SUBSETS["controlled_images"]
    entries = [e for e in json.loads(annotation.read_text()) if Path(e["image_path"]).name not in names]
    annotation.write_text(json.dumps(entries))
    boxes = json.loads((destination / "boxes.json").read_text())
    (destination / "boxes.json").write_text(json.dumps({k: v for k, v in boxes.items() if k not in names}))
    for name in names:
        (destination / "controlled_images" / name).unlink()
    return destination
