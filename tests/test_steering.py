"""Probe amplification (steering/amplify.py, steering/run.py) on synthetic embeddings, the twins and a stand-in
What'sUp directory; the samples of a What'sUp setting; the Table 3 figure redrawn from saved results."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_gen.samples import setting_samples
from data_gen.whatsup import load_splits, write_stand_in
from probing.probes import fit_probe
from steering.amplify import amplify, choose, outcome_metrics, random_directions, token_classes
from steering.run import run
from tests.conftest import SHARED_FIRST_TOKEN, make_cfg
from vlm.results import load_unit, unit_dir

REPO = Path(__file__).resolve().parent.parent
SMALL = ("alphas=[0,1,2]", "random_seeds=[0,1]", "scalingvis.coefficients=[2.0]", "adaptvis.thresholds=[0.5]",
         "batch_size=8")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return write_stand_in(tmp_path_factory.mktemp("whatsup"))


def planted_probe(seed=0, hidden=16):
    """A probe fit on embeddings whose class c is noise plus 3 * planted[c]."""
    rng = np.random.default_rng(seed)
    planted = rng.normal(size=(3, hidden))
    y = np.repeat([0, 1, 2], 50)
    x = rng.normal(size=(150, hidden)) + 3 * planted[y]
    return fit_probe(x, y), rng


def test_adding_a_class_direction_moves_the_probe_to_that_class():
    probe, rng = planted_probe()
    x = torch.from_numpy(rng.normal(size=(1, 30, 16)).astype(np.float32))
    directions = torch.from_numpy(probe.directions().astype(np.float32))
    for c in range(3):
        pushed = amplify(x, directions[[c, c, c]], 50.0, "predicted", token_classes(probe, x))
        assert (probe.predict(pushed.numpy()) == c).all()
        # a small alpha moves the probability of class c up at every token
        before, after = (probe.probabilities(t.numpy())[..., c]
                         for t in (x, amplify(x, directions[[c, c, c]], 0.5, "predicted", token_classes(probe, x))))
        assert (after > before).all()


def test_predicted_variant_adds_each_tokens_own_class_direction_every_class_adds_the_sum():
    tokens = torch.zeros(1, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    classes = torch.tensor([[2, 0, 1]])
    torch.testing.assert_close(amplify(tokens, directions, 2.0, "predicted", classes)[0],
                               torch.tensor([[-2.0, -2.0], [2.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(amplify(tokens, directions, 2.0, "every_class")[0], torch.zeros(3, 2))
    torch.testing.assert_close(amplify(tokens + 1, directions, 0.0, "predicted", classes), tokens + 1)


def test_random_directions_have_the_probe_directions_norms_and_depend_on_the_seed():
    probe, _ = planted_probe()
    for unit in (True, False):
        d = probe.directions(unit=unit)
        norms = np.linalg.norm(d, axis=-1)
        r0, r1 = random_directions(norms, d.shape[1], 0), random_directions(norms, d.shape[1], 1)
        np.testing.assert_allclose(np.linalg.norm(r0, axis=-1), norms, rtol=1e-5)
        assert r0.shape == d.shape and not np.allclose(r0, r1)
        np.testing.assert_array_equal(r0, random_directions(norms, d.shape[1], 0))


def test_corrected_and_broken_arithmetic():
    before = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    after = np.array([1, 1, 1, 0, 1, 1, 1, 0, 0, 0], bool)
    m = outcome_metrics(before, after)
    assert m["accuracy"] == 0.6 and m["n"] == 10 and m["n_wrong_before"] == 6
    assert m["corrected"] == pytest.approx(3 / 6) and m["broken"] == pytest.approx(1 / 4)
    assert np.isnan(outcome_metrics(np.ones(3, bool), np.ones(3, bool))["corrected"])
    assert choose([0.2, 0.5, 0.5, 0.1]) == 1      # the earliest best value


def test_alpha_zero_leaves_logits_unchanged(twin, stand_in):
    cfg = make_cfg(f"model={twin.name}", "setting=whatsup", f"data.whatsup_dir={stand_in}")
    samples = setting_samples(cfg, "test")[:2]
    inputs = twin.encode([s.image for s in samples], [s.prompt for s in samples])
    tokens = twin.visual_tokens(inputs)
    probe, _ = planted_probe(hidden=tokens.shape[-1])
    directions = torch.from_numpy(probe.directions().astype(np.float32))
    plain = twin.last_logits(inputs)
    for variant in ("predicted", "every_class"):
        zero = twin.last_logits(inputs, amplify(tokens, directions, 0.0, variant, token_classes(probe, tokens)))
        torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-5)
    moved = twin.last_logits(inputs, amplify(tokens, directions, 50.0, "every_class"))
    assert not torch.allclose(moved, plain)


def test_whatsup_samples_are_both_directions_of_one_split(stand_in):
    cfg = make_cfg("model=tiny_qwen2vl", "setting=whatsup", f"data.whatsup_dir={stand_in}")
    splits = load_splits(cfg)
    test = setting_samples(cfg, "test")
    assert len(test) == 2 * len(splits["test"]) and [s.direction for s in test[:2]] == ["left", "right"]
    images = setting_samples(cfg, "train", queried=False)
    assert len(images) == len(splits["train"]) and images[0].prompt is None
    assert not {s.id.split("_", 1)[1] for s in images} & {c.id for c in splits["test"]}


@pytest.mark.parametrize("model", [pytest.param("tiny_qwen2vl", marks=SHARED_FIRST_TOKEN), "tiny_gemma3"])
def test_amplification_end_to_end_and_table_redraws(stand_in, tmp_path, model):
    cfg = make_cfg(f"model={model}", "experiment=amplification", f"data.whatsup_dir={stand_in}",
                   f"results_dir={tmp_path / 'results'}", "variants=[predicted,every_class]", *SMALL)
    run(cfg)
    record, arrays = load_unit(unit_dir(cfg, "amplification"))
    metrics = record["metrics"]
    n_val, n_test = (2 * len(load_splits(cfg)[s]) for s in ("val", "test"))
    assert arrays["test.pred.probe.predicted"].shape == (3, n_test)
    assert arrays["val.pred.random.every_class"].shape == (2, 3, n_val)
    assert arrays["test.pred.scalingvis"].shape == (1, n_test) and arrays["test.pred.adaptvis"].shape == (1, n_test)
    for method in ("probe.predicted", "probe.every_class", "random.predicted", "random.every_class"):
        # alpha = 0 is no intervention
        np.testing.assert_array_equal(arrays[f"test.pred.{method}"][..., 0, :], np.broadcast_to(
            arrays["test.pred.none"], arrays[f"test.pred.{method}"][..., 0, :].shape))
        curve = [m["accuracy"] for m in metrics["splits"]["val"][method]["curve"]]
        assert metrics["chosen"][method] == [0, 1, 2][int(np.argmax(curve))]
        k = [0, 1, 2].index(metrics["chosen"][method])
        assert metrics["table"][method]["accuracy"] == metrics["splits"]["test"][method]["curve"][k]["accuracy"]
    correct = arrays["test.pred.probe.predicted"][2] == arrays["test.answer"]
    assert metrics["splits"]["test"]["probe.predicted"]["curve"][2]["accuracy"] == pytest.approx(correct.mean())
    assert np.allclose(np.linalg.norm(arrays["random_directions"], axis=-1), 1.0, atol=1e-5)
    assert metrics["probe"]["n_train_images"] == len(load_splits(cfg)["train"])

    out = tmp_path / "figure"
    done = subprocess.run([sys.executable, "figures/table3_amplification/plot.py", "--results",
                           str(tmp_path / "results"), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = (out / "table3.md").read_text()
    for label in ("None", "Random amp. (predicted)", "ScalingVis", "AdaptVis", "Ordering amp. (every_class)"):
        assert f"| {label} |" in table
    assert (out / f"table3_{model}_whatsup_alpha.png").stat().st_size > 0
    assert len(json.loads((out / "table3.json").read_text())) == 7


@pytest.mark.parametrize("args,needle", [
    ([], "data.whatsup_dir is not set"),
    (["data.whatsup_dir=/no/such/whatsup"], "/no/such/whatsup"),
    (["data.whatsup_dir=.", "variants=[sideways]"], "sideways"),
    (["data.whatsup_dir=.", "setting=squares"], "setting=whatsup"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, needle):
    done = subprocess.run([sys.executable, "-m", "steering.run", "model=tiny_qwen2vl", "device=cpu",
                           f"results_dir={tmp_path / 'results'}", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not (tmp_path / "results").exists()


def test_whatsup_probes_label_every_token_of_unequal_boxes(stand_in, tmp_path):
    """Gemma's 16 columns cut at thirds give parts of 5, 6 and 5 columns: item tokens are padded with -1 and
    every token inside a box is a training example labelled with the box's position."""
    from probing.run import run as run_probes

    cfg = make_cfg("model=tiny_gemma3", "experiment=whatsup_probes", f"data.whatsup_dir={stand_in}",
                   f"results_dir={tmp_path}", f"embeddings_dir={tmp_path / 'emb'}", "n_train=3", "n_test=2")
    run_probes(cfg)
    record, arrays = load_unit(unit_dir(cfg, "whatsup_probes"))
    m = record["metrics"]["probes"]["horizontal"]
    assert m["n_train_images"] == 3 and m["n_train_tokens"] == 3 * 16 * 16 and m["n_test_images"] == 2
    item_map = arrays["horizontal.item_map"]
    assert [int((item_map == k).sum()) for k in range(3)] == [16 * 5, 16 * 6, 16 * 5]
