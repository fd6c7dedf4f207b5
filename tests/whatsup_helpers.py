"""The What'sUp stand-in for the tests: one directory written once per test session (`stand_in_dir`), the
config that reads it (`whatsup_cfg`), and a copy without some photos (`without_photos`).

A test module takes the shared directory through a one-line fixture,

    @pytest.fixture(scope="module")
    def stand_in(tmp_path_factory):
        return stand_in_dir(tmp_path_factory)

and must not change it; a test that changes photos or boxes writes its own (`write_stand_in`, `without_photos`).
"""

import json
import shutil
from pathlib import Path

from data_gen.whatsup import SUBSETS, write_stand_in
from tests.conftest import make_cfg

_written: dict[str, Path] = {}


def stand_in_dir(tmp_path_factory) -> Path:
    """The stand-in What'sUp directory (data_gen.whatsup.write_stand_in: 8 object-reference combinations, each
    photographed left of, right of, on and under its reference, and their known boxes in boxes.json), written on
    the first call of the session and shared after it."""
    if "root" not in _written:
        _written["root"] = write_stand_in(tmp_path_factory.mktemp("whatsup_stand_in") / "data")
    return _written["root"]


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
