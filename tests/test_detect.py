"""The `boxes` command (data_gen/whatsup/detect.py) with a tiny OWLv2 built from config in code, saved to a directory
and loaded through the same from_pretrained path as google/owlv2-base-patch16-ensemble; the `stand_in`
command and its known box file."""

import json
import string
from pathlib import Path

import pytest

from data_gen.whatsup import (
    SIDE_OF_RELATION,
    STAND_IN_COMBOS,
    STAND_IN_SIZE,
    load_composites,
    read_boxes,
    stand_in_boxes,
    with_boxes,
)
from data_gen.whatsup.__main__ import main
from data_gen.whatsup.detect import pixel_box
from tests.helpers import make_cfg, run_command

REPO = Path(__file__).resolve().parent.parent
PHOTOS = {f"{obj}_{relation}_{ref}.jpeg" for obj, ref in STAND_IN_COMBOS for relation in SIDE_OF_RELATION}


def build_tiny_owlv2(path: Path) -> Path:
    """An Owlv2ForObjectDetection with tiny text and vision towers (64 px images, 4 x 4 patches) and random
    weights, an Owlv2Processor with a character-level CLIPTokenizer ('!' is id 0, as in CLIP, since OWLv2
    takes a query starting with id 0 for padding), saved under `path`. The box head's last layer is zeroed,
    so every patch proposes its own cell (well-formed boxes), and the logit shift and scale, so a score is
    sigmoid(cosine of patch and query), between 0.27 and 0.73."""
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                               tokenizer=tokenizer)
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Owlv2Config(text_config={**tower, "vocab_size": len(vocab), "max_position_embeddings": 32,
                                      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
                         vision_config={**tower, "image_size": 64, "patch_size": 16}, projection_dim=16)
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():
        for layer in (model.box_head.dense2, model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.zero_()
            layer.bias.zero_()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory):
    return build_tiny_owlv2(tmp_path_factory.mktemp("tiny_owlv2"))


def boxes_args(root, out, detector, *more):
    return ["boxes", f"data.whatsup_dir={root}", f"data.whatsup_boxes={out}", f"detector.path={detector}",
            "device=cpu", "detector.batch_size=5", *more]


def test_boxes_command_runs_end_to_end_writes_a_valid_box_file_and_resumes(tiny_owlv2, stand_in, tmp_path, capsys):
    out = tmp_path / "detected" / "boxes.json"
    done = run_command(main, *boxes_args(stand_in, out, tiny_owlv2, "detector.threshold=0.0"))
    assert done.returncode == 0, done.stderr
    n = 2 * len(STAND_IN_COMBOS)                  # each combination's left_of and right_of photo
    assert f"{n} left/right photos, 0 already in {out}, {n} to detect" in done.stdout
    assert f"-> {out} (use data.whatsup_boxes={out})" in done.stdout
    assert "detecting boxes" not in done.stderr      # progress bars only on a terminal (common.cli.quiet_output)
    entries = json.loads(out.read_text())
    assert set(entries) == PHOTOS
    width, height = STAND_IN_SIZE
    found = 0
    for entry in entries.values():
        assert set(entry) == {"object", "reference", "scores"}
        for key in ("object", "reference"):
            box, score = entry[key], entry["scores"][key]
            assert (box is None) == (score is None)
            if box is not None:
                found += 1
                assert all(isinstance(v, int) for v in box) and 0 <= box[0] < box[2] <= width
                assert 0 <= box[1] < box[3] <= height and 0.0 <= score <= 1.0
    assert found > 0
    assert read_boxes(out).keys() == PHOTOS                      # the loader's reader takes the file
    cfg = make_cfg("model=tiny_qwen2vl", "setting=whatsup", f"data.whatsup_dir={stand_in}",
                   f"data.whatsup_boxes={out}", "setting.n_composites=null")
    composites = load_composites(cfg)          # random boxes: the composites are the same, most without boxes
    assert len(composites) == 26 and with_boxes(composites)[1]["with_boxes"] < 26

    # resume: nothing left to detect, the file untouched; after dropping three entries only those are redone
    before = out.read_text()
    assert main(boxes_args(stand_in, out, tiny_owlv2, "detector.threshold=0.0")) == 0
    assert f"{2 * len(STAND_IN_COMBOS)} already in" in capsys.readouterr().out and out.read_text() == before
    dropped = sorted(PHOTOS)[:3]
    out.write_text(json.dumps({k: v for k, v in entries.items() if k not in dropped}))
    assert main(boxes_args(stand_in, out, tiny_owlv2, "detector.threshold=0.0")) == 0
    assert f"{2 * len(STAND_IN_COMBOS) - 3} already in" in capsys.readouterr().out
    assert json.loads(out.read_text()) == entries                # same deterministic detector, same boxes
    assert not list(out.parent.glob(".*.tmp"))                   # atomic writes leave no temporary file


def test_names_not_found_are_null_reported_and_their_composites_dropped_where_boxes_are_needed(
        tiny_owlv2, stand_in, tmp_path, capsys):
    out = tmp_path / "none.json"
    assert main(boxes_args(stand_in, out, tiny_owlv2, "detector.threshold=0.9")) == 0
    printed = capsys.readouterr().out
    assert f"{4 * len(STAND_IN_COMBOS)} names not found above detector.threshold=0.9" in printed
    assert "beer-bottle_left_of_chair.jpeg: object 'beer bottle'" in printed
    entries = json.loads(out.read_text())
    assert all(e["object"] is None and e["reference"] is None for e in entries.values())
    cfg = make_cfg("model=tiny_qwen2vl", "setting=whatsup", f"data.whatsup_dir={stand_in}",
                   f"data.whatsup_boxes={out}", "setting.n_composites=null")
    composites = load_composites(cfg)          # the same composites; none has boxes, each counted as not found
    assert len(composites) == 26 and {c.box_issue for c in composites} == {"not found"}
    assert with_boxes(composites) == ([], {"n": 26, "with_boxes": 0, "dropped_box_not_found": 26,
                                           "dropped_box_outside": 0})


@pytest.mark.parametrize("override,needle", [
    ("detector.threshold=2", "detector.threshold=2"),
    ("detector.query=photo", "must contain {name}"),
    ("detector.batch_size=0", "detector.batch_size=0"),
    ("detector.path=/no/such/owlv2", "detector.path '/no/such/owlv2' does not exist"),
    ("detector.nonsense=1", "bad override"),
])
def test_bad_detector_config_is_one_line_and_writes_nothing(stand_in, tmp_path, capsys, override, needle):
    out = tmp_path / "boxes.json"
    assert main(boxes_args(stand_in, out, "unused/owlv2", override)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not out.exists()


def test_stand_in_command_writes_the_known_boxes_in_both_forms(tmp_path, capsys):
    assert main(["stand_in", str(tmp_path / "a")]) == 0              # the older positional form
    assert main(["stand_in", f"data.whatsup_dir={tmp_path / 'b'}", "seed=1"]) == 0
    assert f"data.whatsup_boxes={tmp_path / 'b' / 'boxes.json'}" in capsys.readouterr().out
    for name in ("a", "b"):
        known = json.loads((tmp_path / name / "boxes.json").read_text())
        assert known == stand_in_boxes() and set(known) == PHOTOS
        assert known["mug_left_of_chair.jpeg"] == {"object": [15, 60, 41, 90], "reference": [62, 40, 98, 100]}
        assert known["mug_right_of_chair.jpeg"] == {"object": [119, 60, 145, 90], "reference": [62, 40, 98, 100]}
    assert main(["stand_in", str(tmp_path / "a")]) == 2               # exists already
    assert "already exists" in capsys.readouterr().err
    assert main(["sideways"]) == 2


def test_pixel_box_widens_to_whole_pixels_and_clips_to_the_photo():
    assert pixel_box([10.2, 5.9, 20.1, 30.0], 160, 120) == [10, 5, 21, 30]
    assert pixel_box([-3.0, 100.0, 170.0, 150.0], 160, 120) == [0, 100, 160, 120]
    assert pixel_box([160.0, 10.0, 165.0, 20.0], 160, 120) is None      # wholly in OWLv2's padding
