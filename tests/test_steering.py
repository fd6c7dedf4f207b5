"""Probe amplification (steering/amplify.py, steering/run.py) on synthetic embeddings, the twins and a stand-in
What'sUp directory; the samples of a What'sUp setting; the Table 3 figure redrawn from saved results."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import steering.run
from common.errors import UsageError
from common.results import load_unit, unit_dir
from data_gen.samples import setting_samples
from data_gen.settings import Setting
from data_gen.whatsup import load_splits
from probing.probes import Probe, fit_probe
from runner import run_unit
from steering.amplify import (
    amplify,
    choose,
    class_directions,
    outcome_metrics,
    random_directions,
    token_classes,
)
from steering.run import attention_method_probabilities, check_inputs, full_grids, passes, predictions
from steering.scalingvis import adaptvis_rows, choose_coefficients, scalingvis_edits
from tests.helpers import load_twin, make_cfg, run_plot, without_photos
from vlm.replay import record
from vlm.scoring import AnswerScorer, candidate_probabilities

REPO = Path(__file__).resolve().parent.parent
SMALL = ("alphas=[0,1,2]", "random_seeds=[0,1]", "scalingvis.coefficients=[0,2.0]", "adaptvis.weight1=[0.5]",
         "adaptvis.weight2=[1.5,2.0]", "adaptvis.thresholds=[0.5,1.0]", "image_attention_reweighting.coefficients=[2.0]",
         "batch_size=8")
TINY = ("alphas=[0,2]", "random_seeds=[0]", "scalingvis.coefficients=[2.0]", "adaptvis.weight1=[0.5]",
        "adaptvis.weight2=[2.0]", "adaptvis.thresholds=[0.5,1.0]", "image_attention_reweighting.coefficients=[2.0]",
        "batch_size=8")


def no_model():
    raise AssertionError("the model was loaded before the input was refused")


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
        pushed = amplify(x, directions[[c, c, c]], 50.0, token_classes(probe, x))
        assert (probe.predict(pushed.numpy()) == c).all()
        # a small alpha moves the probability of class c up at every token
        before, after = (probe.probabilities(t.numpy())[..., c]
                         for t in (x, amplify(x, directions[[c, c, c]], 0.5, token_classes(probe, x))))
        assert (after > before).all()


def test_each_token_gets_its_own_classs_direction_times_alpha():
    tokens = torch.zeros(1, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    classes = torch.tensor([[2, 0, 1]])
    torch.testing.assert_close(amplify(tokens, directions, 2.0, classes)[0],
                               torch.tensor([[-2.0, -2.0], [2.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(amplify(tokens + 1, directions, 0.0, classes), tokens + 1)


def test_every_class_direction_on_every_token_needs_one_vs_rest_rows():
    """directions_per_token=all: every token gets alpha * (row_0 + row_1 + row_2). A multinomial probe's rows sum to
    about zero (so that reading would add nothing); one-vs-rest rows, fit as k binary regressions, do not, and
    each predicts its own class against the rest."""
    tokens = torch.zeros(1, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-3.0, 2.0]])
    torch.testing.assert_close(amplify(tokens, directions, 2.0)[0], torch.tensor([[-4.0, 6.0]] * 3))
    probe, rng = planted_probe()
    rows = class_directions(probe, "probe")
    assert np.linalg.norm(rows.sum(0)) < 1e-3 * np.linalg.norm(rows, axis=-1).max()
    y = np.repeat([0, 1, 2], 50)
    x = rng.normal(size=(150, 16)) + 3 * rng.normal(size=(3, 16))[y]
    ovr = fit_probe(x, y, rows="one_vs_rest")
    z = StandardScaler().fit_transform(x)
    for c in range(3):                       # row c is the binary regression of class c against the rest
        binary = LogisticRegression(max_iter=1000, random_state=0).fit(z, y == c)
        np.testing.assert_allclose(ovr.weight[c], binary.coef_[0], rtol=1e-4, atol=1e-5)
    ovr_rows = class_directions(ovr, "probe")
    assert np.linalg.norm(ovr_rows.sum(0)) > 0.1 * np.linalg.norm(ovr_rows, axis=-1).max()
    assert (ovr.predict(x) == y).mean() > 0.9


def test_directions_are_the_probes_rows_in_embedding_space_or_unit():
    """Equation 3's probe_i is the probe's weight row for class i over the standardisation scale, as it is: the
    added vector is alpha times that recorded row; the unit option has norm alpha."""
    probe, rng = planted_probe()
    rows = class_directions(probe, "probe")
    np.testing.assert_allclose(rows, probe.weight / probe.scale, rtol=1e-6)
    x = rng.normal(size=(1, 5, 16)).astype(np.float32)
    logits = probe.logits(x)
    for c in range(3):       # the row is the gradient of class c's logit: a step along it moves that logit by |row|^2
        stepped = probe.logits(x + 1e-3 * rows[c])
        np.testing.assert_allclose(stepped[..., c] - logits[..., c], 1e-3 * (rows[c] ** 2).sum(), rtol=1e-3)
    classes = token_classes(probe, torch.from_numpy(x))
    tokens = torch.from_numpy(x)
    added = amplify(tokens, torch.from_numpy(rows), 3.0, classes) - tokens
    torch.testing.assert_close(added[0], 3.0 * torch.from_numpy(rows)[classes[0]], rtol=1e-5, atol=1e-6)
    unit = class_directions(probe, "unit")
    added = amplify(tokens, torch.from_numpy(unit), 3.0, classes) - tokens
    torch.testing.assert_close(added.norm(dim=-1), torch.full((1, 5), 3.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="sideways"):
        class_directions(probe, "sideways")


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
    classes = token_classes(probe, tokens)
    zero = twin.last_logits(inputs, amplify(tokens, directions, 0.0, classes))
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-5)
    moved = twin.last_logits(inputs, amplify(tokens, directions, 50.0, classes))
    assert not torch.allclose(moved, plain)


def test_whatsup_samples_are_both_directions_of_one_split(stand_in):
    cfg = make_cfg("model=tiny_qwen2vl", "setting=whatsup", f"data.whatsup_dir={stand_in}")
    splits = load_splits(cfg)
    test = setting_samples(cfg, "test")
    assert len(test) == 2 * len(splits["test"]) and [s.direction for s in test[:2]] == ["left", "right"]
    images = setting_samples(cfg, "train", queried=False)
    assert len(images) == len(splits["train"]) and images[0].prompt is None
    assert not {s.id.split("_", 1)[1] for s in images} & {c.id for c in splits["test"]}


def counting(monkeypatch, twin) -> dict:
    """Count the rows of every LM forward (`lm`: the adapter's forward over image and prompt; the answers'
    continuations are not forwards over the image), every image through the vision tower (`vision`) and every
    row replayed from a recorded forward (`replayed`: the attention methods' last positions)."""
    counts = {"lm": 0, "vision": 0, "replayed": 0}
    forward, features = twin.adapter.forward, twin.adapter.image_features
    replayed = steering.run.replayed_probabilities

    def counted_replay(vlm, scorer, rows, batch_size):
        counts["replayed"] += len(rows)
        return replayed(vlm, scorer, rows, batch_size)

    monkeypatch.setattr(steering.run, "replayed_probabilities", counted_replay)

    def counted_forward(model, inputs, visual_tokens=None, **kwargs):
        counts["lm"] += inputs["input_ids"].shape[0]
        counts["vision"] += inputs["input_ids"].shape[0] if visual_tokens is None else 0
        return forward(model, inputs, visual_tokens, **kwargs)

    def counted_features(model, inputs):
        counts["vision"] += inputs["input_ids"].shape[0]
        return features(model, inputs)

    monkeypatch.setattr(twin.adapter, "forward", counted_forward)
    monkeypatch.setattr(twin.adapter, "image_features", counted_features)
    return counts


@pytest.mark.parametrize("model", ["tiny_qwen2vl", pytest.param("tiny_gemma3", marks=pytest.mark.slow)])
def test_amplification_end_to_end_and_table_redraws(stand_in, tmp_path, model, monkeypatch):
    """protocol=val_test: every grid on val, each method once on test at the value chosen on val; the passes made
    are the dry run's count (steering.run.passes). 8 of the 26 stand-in composites: train 5, val 1, test 2."""
    twin = load_twin(model)
    cfg = make_cfg(f"model={model}", "experiment=amplification", f"data.whatsup_dir={stand_in}",
                   f"data.whatsup_boxes={stand_in / 'boxes.json'}", f"results_dir={tmp_path / 'results'}",
                   f"embeddings_dir={tmp_path / 'emb'}", "setting.n_composites=8", *SMALL)
    counts = counting(monkeypatch, twin)
    run_unit(cfg, lambda: twin)
    assert counts == {key: passes(cfg)[key] for key in ("lm", "vision", "replayed")}
    record, arrays = load_unit(unit_dir(cfg))
    metrics = record["metrics"]
    splits = load_splits(cfg)
    n_val, n_test = (2 * len(splits[s]) for s in ("val", "test"))
    assert (metrics["protocol"], metrics["grid_split"], metrics["report_split"]) == ("val_test", "val", "test")
    assert arrays["val.pred.probe"].shape == (3, n_val) and arrays["val.pred.random"].shape == (2, 3, n_val)
    assert arrays["val.pred.scalingvis"].shape == (2, n_val) and arrays["val.pred.adaptvis"].shape == (4, n_val)
    for method in ("probe", "scalingvis", "adaptvis", "image_attention_reweighting"):
        assert arrays[f"test.pred.{method}"].shape == (1, n_test)          # once, at the chosen value
    assert arrays["test.pred.random"].shape == (2, 1, n_test)              # the chosen alpha, every seed
    assert metrics["grids"]["adaptvis"] == [{"weight1": 0.5, "weight2": w2, "threshold": t}
                                            for w2 in (1.5, 2.0) for t in (0.5, 1.0)]
    # alpha = 0 is no intervention
    np.testing.assert_array_equal(arrays["val.pred.probe"][0], arrays["val.pred.none"])
    for method in ("probe", "random", "scalingvis", "adaptvis", "image_attention_reweighting"):
        # each method's setting is the earliest best on val, and the table is test at that setting
        curve = [m["accuracy"] for m in metrics["splits"]["val"][method]["curve"]]
        k = int(np.argmax(curve))
        assert metrics["chosen"][method] == metrics["grids"][method][k]
        assert metrics["table"][method]["chosen"] == metrics["chosen"][method]
        assert metrics["table"][method]["accuracy"] == metrics["splits"]["test"][method]["curve"][0]["accuracy"]
    correct = arrays["test.pred.probe"][0] == arrays["test.answer"]
    assert metrics["table"]["probe"]["accuracy"] == pytest.approx(correct.mean())
    # AdaptVis on val: each example gets ScalingVis at weight1 below the threshold, else at weight2
    confidence = arrays["val.adaptvis_confidence"]
    np.testing.assert_array_equal(confidence, np.round(confidence, 2))
    for k, chosen in enumerate(metrics["grids"]["adaptvis"]):
        if chosen["weight2"] == 2.0:                        # ScalingVis ran at 2.0 (grid [0, 2.0])
            high = confidence >= chosen["threshold"]
            np.testing.assert_array_equal(arrays["val.pred.adaptvis"][k][high], arrays["val.pred.scalingvis"][1][high])
    # the paper's scale: the probe's own rows (w / scale), their norms recorded, random directions of those norms
    rows = arrays["horizontal.weight"] / arrays["horizontal.scale"]
    np.testing.assert_allclose(metrics["probe"]["direction_norms"], np.linalg.norm(rows, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(arrays["random_directions"], axis=-1),
                               np.broadcast_to(np.linalg.norm(rows, axis=-1), (2, 3)), rtol=1e-5)
    # the probe: the first 90 (here all 5) train composites with boxes, tested on 30 (here all 2) of test
    composites = metrics["probe"]["composites"]
    assert composites["train"] == {"n": 5, "with_boxes": 5, "dropped_box_not_found": 0, "dropped_box_outside": 0,
                                   "used": 5}
    assert composites["test"]["used"] == 2 and metrics["probe"]["n_train_images"] == 5
    assert 0 <= metrics["probe"]["test_accuracy"] <= 1 and metrics["probe"]["rows"] == "multinomial"
    # the None row over every composite: train, val and test, both directions each
    every = metrics["none_all_composites"]
    assert every["n"] == 2 * sum(len(c) for c in splits.values()) and 0 <= every["accuracy"] <= 1
    assert 0 < metrics["mean_p_answer"] < 1 and metrics["p_uniform_token"] == 1 / len(twin.tokenizer)

    out = tmp_path / "figure"
    assert run_plot("table3_amplification", "--results", str(tmp_path / "results"), "--out", str(out)) == 0
    table = (out / "table3.md").read_text()
    for label in ("None", "None (all composites)", "Random amp.", "ScalingVis", "AdaptVis", "Ordering amp.",
                  "Attention reweighting (not ScalingVis)"):
        assert f"| chosen on val, test | {label} |" in table
    chosen = metrics["chosen"]["adaptvis"]
    assert (f"| AdaptVis | weight1 {chosen['weight1']:g}, weight2 {chosen['weight2']:g}, threshold "
            f"{chosen['threshold']:g} |") in table
    assert f"| ScalingVis | coefficient {metrics['chosen']['scalingvis']['coefficient']:g} |" in table
    assert "probe (multinomial rows) fit on 5 train composites with boxes" in table
    assert (out / f"table3_{model}_whatsup_alpha.png").stat().st_size > 0
    assert len(json.loads((out / "table3.json").read_text())) == 7
    if model != "tiny_qwen2vl":
        return
    # One composite set: the None row over all composites is Table 1's What'sUp column on the same composites
    accuracy = make_cfg(f"model={model}", "experiment=accuracy", "setting=whatsup", f"data.whatsup_dir={stand_in}",
                        f"data.whatsup_boxes={stand_in / 'boxes.json'}", "split=all", "setting.n_composites=8",
                        f"results_dir={tmp_path / 'results'}")
    table1, table1_arrays = load_unit(run_unit(accuracy, lambda: twin))
    ids = np.concatenate([arrays[f"{s}.sample_id"] for s in ("val", "test")])
    assert set(ids) < set(table1_arrays["sample_id"])
    assert every["accuracy"] == pytest.approx(table1["metrics"]["accuracy"]) and every["n"] == table1["metrics"]["n"]
    # Running a method once at its chosen value gives what the full grid gives at that value
    test = setting_samples(cfg, "test")[:2]
    scorer = AnswerScorer(twin.tokenizer, Setting.from_config(cfg.setting).candidates)
    probe = Probe.from_arrays(arrays, "horizontal")
    directions = {"probe": torch.from_numpy(rows.astype(np.float32)),
                  "random": torch.from_numpy(arrays["random_directions"])}
    full, _, _ = predictions(twin, scorer, test, probe, directions, full_grids(cfg), cfg, desc="full grid")
    for method in ("probe", "scalingvis", "adaptvis", "image_attention_reweighting"):
        k = metrics["grids"][method].index(metrics["chosen"][method])
        np.testing.assert_array_equal(full[method][k], arrays[f"test.pred.{method}"][0][:2])
    k = metrics["grids"]["random"].index(metrics["chosen"]["random"])
    np.testing.assert_array_equal(full["random"][:, k], arrays["test.pred.random"][:, 0, :2])


@pytest.mark.slow
def test_paper_protocol_reports_the_best_value_over_all_composites(stand_in, tmp_path, monkeypatch):
    """protocol=paper: every grid on all composites; each method at its best value there (the paper's "up to");
    None is then over all composites; every token gets every class's one-vs-rest row (directions_per_token=all);
    the passes made are the dry run's count."""
    twin = load_twin("tiny_qwen2vl")
    cfg = make_cfg("model=tiny_qwen2vl", "experiment=amplification", f"data.whatsup_dir={stand_in}",
                   f"data.whatsup_boxes={stand_in / 'boxes.json'}", f"results_dir={tmp_path / 'results'}",
                   f"embeddings_dir={tmp_path / 'emb'}", "setting.n_composites=4", "protocol=paper",
                   "directions_per_token=all", *TINY)
    counts = counting(monkeypatch, twin)
    run_unit(cfg, lambda: twin)
    assert counts == {key: passes(cfg)[key] for key in ("lm", "vision", "replayed")}
    record, arrays = load_unit(unit_dir(cfg))
    metrics = record["metrics"]
    assert (metrics["grid_split"], metrics["report_split"], list(metrics["splits"])) == ("all", "all", ["all"])
    assert arrays["all.pred.probe"].shape == (2, 8) and arrays["all.pred.adaptvis"].shape == (2, 8)
    for method in ("probe", "random", "scalingvis", "adaptvis", "image_attention_reweighting"):
        curve = metrics["splits"]["all"][method]["curve"]
        k = int(np.argmax([c["accuracy"] for c in curve]))
        assert metrics["table"][method]["accuracy"] == max(c["accuracy"] for c in curve) == curve[k]["accuracy"]
    assert metrics["none_all_composites"] == {"accuracy": metrics["splits"]["all"]["none"]["accuracy"], "n": 8}
    assert metrics["probe"]["rows"] == "one_vs_rest" and metrics["directions_per_token"] == "all"
    out = tmp_path / "figure"
    assert run_plot("table3_amplification", "--results", str(tmp_path / "results"), "--out", str(out)) == 0
    assert "| paper: best on all composites (up to) | Ordering amp. |" in (out / "table3.md").read_text()


def test_the_attention_function_gives_adaptvis_per_sample_coefficients_in_one_forward(twin, stand_in):
    """attention_method_probabilities (the last position replayed from each sample's recorded plain forward) with
    one coefficient per sample equals, row by row, the ScalingVis runs at each sample's coefficient (what a grid of
    AdaptVis triples reads) and the full forward under the same edits; all ones is the plain run."""
    cfg = make_cfg(f"model={twin.name}", "setting=whatsup", f"data.whatsup_dir={stand_in}")
    samples = setting_samples(cfg, "val")[:2]
    inputs = twin.encode([s.image for s in samples], [s.prompt for s in samples])
    tokens = twin.visual_tokens(inputs)
    records = record(twin, twin.adapter.split_batch(inputs), list(tokens[:, None]), 2)
    scorer = AnswerScorer(twin.tokenizer, ["mug", "cap", "bottle", "bottle of mustard", "chair"])
    plain, logits = candidate_probabilities(twin, scorer, inputs, tokens)

    def method(name, coefficients):
        return attention_method_probabilities(twin, scorer, records, inputs, tokens, name, coefficients, "all")

    low, high = method("scalingvis", 0.5), method("scalingvis", 2.0)
    confidence = torch.tensor([0.3, 0.7], dtype=torch.float64)
    chosen = choose_coefficients(confidence, 0.5, 0.5, 2.0)
    mixed = method("adaptvis", chosen)
    torch.testing.assert_close(mixed, adaptvis_rows(confidence, 0.5, low, high), rtol=1e-4, atol=1e-6)
    full = candidate_probabilities(twin, scorer, inputs, tokens, scalingvis_edits(twin, inputs["input_ids"], chosen))[0]
    torch.testing.assert_close(mixed, full, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(method("scalingvis", 1.0), plain, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(low, high)


@pytest.mark.parametrize("args,needle", [
    ([], "data.whatsup_dir is not set"),
    (["data.whatsup_dir=/no/such/whatsup"], "/no/such/whatsup"),
    (["directions=sideways"], "sideways"),
    (["protocol=test_only"], "unknown protocol 'test_only'; allowed: val_test, paper"),
    (["directions_per_token=some"], "unknown directions_per_token 'some'; allowed: predicted, all"),
    (["directions_per_token=all", "probes_from=/some/unit"], "needs one-vs-rest rows fit here"),
    (["setting=squares"], "does not run on setting 'squares'"),
    (["{boxes}", "setting.splits={train:0.7,val:0.0,test:0.3}"], "leaves the val split empty (26 composites)"),
    (["{boxes}", "setting.n_composites=3"], "leaves the val split empty (3 composites)"),
    (["data.whatsup_boxes=null"], "data.whatsup_boxes is not set: make them with `python -m data_gen.whatsup boxes "
                                  "data.whatsup_dir={dir}` (an open-vocabulary detector), then pass "
                                  "data.whatsup_boxes=FILE"),
    (["data.whatsup_boxes=/no/boxes.json"], "data.whatsup_boxes=/no/boxes.json does not exist"),
])
def test_bad_input_is_one_line_before_the_model_loads_and_writes_nothing(stand_in, tmp_path, args, needle):
    """In process: a one-line UsageError (the command line prints it and exits 2), no model, no results."""
    given = [a.replace("{boxes}", f"data.whatsup_boxes={stand_in / 'boxes.json'}") for a in args]
    where = [] if args and args[0].startswith("data.whatsup_dir") or not args else [f"data.whatsup_dir={stand_in}"]
    cfg = make_cfg("experiment=amplification", "model=tiny_qwen2vl", f"results_dir={tmp_path / 'results'}",
                   *where, *given)
    with pytest.raises(UsageError) as err:
        run_unit(cfg, no_model)
    message = str(err.value)
    assert "\n" not in message and needle.replace("{dir}", str(stand_in)) in message, message
    assert not (tmp_path / "results").exists()


def test_bad_data_is_one_line_before_the_model_loads(stand_in, tmp_path):
    root = without_photos(stand_in, tmp_path / "w", [])
    (root / "controlled_images" / "cap_left_of_chair.jpeg").unlink()
    cfg = make_cfg("experiment=amplification", "model=tiny_qwen2vl", f"data.whatsup_dir={root}",
                   f"data.whatsup_boxes={root / 'boxes.json'}", f"results_dir={tmp_path / 'results'}")
    with pytest.raises(UsageError, match="cap_left_of_chair.jpeg is missing"):
        run_unit(cfg, no_model)
    assert not (tmp_path / "results").exists()


def test_whatsup_probes_train_only_on_the_tokens_inside_the_boxes(stand_in, tmp_path):
    """The stand-ins' known boxes on Gemma's 16 x 16 grid of 56 px tokens (896 x 896; x scales by 5.6, y by
    896/120), by hand: left object (15, 60, 41, 90) -> (84, 448, 230, 672), tokens rows [8, 12) x cols [1, 5)
    = 16; reference (62, 40, 98, 100) -> (347, 298, 549, 747), rows [5, 14) x cols [6, 10) = 36; right object
    (119, 60, 145, 90) -> (666, 448, 812, 672), rows [8, 12) x cols [11, 15) = 16. Unequal boxes: item tokens
    are padded with -1; only the 68 tokens inside boxes of each image are training examples (of 256)."""
    from probing.extract import Embeddings

    cfg = make_cfg("model=tiny_gemma3", "experiment=whatsup_probes", f"data.whatsup_dir={stand_in}",
                   f"data.whatsup_boxes={stand_in / 'boxes.json'}", f"results_dir={tmp_path}",
                   f"embeddings_dir={tmp_path / 'emb'}", "n_train=3", "n_test=2")
    run_unit(cfg, lambda: load_twin("tiny_gemma3"))
    record, arrays = load_unit(unit_dir(cfg))
    m = record["metrics"]["probes"]["horizontal"]
    assert record["metrics"]["whatsup_composites"] == {
        split: {"n": n, "with_boxes": n, "dropped_box_not_found": 0, "dropped_box_outside": 0, "used": used}
        for split, n, used in (("train", 16, 3), ("test", 8, 2))}
    assert m["n_train_images"] == 3 and m["n_train_tokens"] == 3 * (16 + 36 + 16) and m["n_test_images"] == 2
    assert m["n_test_tokens"] == 2 * (16 + 36 + 16)
    expected = np.full((16, 16), -1)
    expected[8:12, 1:5], expected[5:14, 6:10], expected[8:12, 11:15] = 0, 1, 2
    np.testing.assert_array_equal(arrays["horizontal.item_map"], expected)
    np.testing.assert_array_equal(arrays["horizontal.example_item_box"], [[8, 1, 12, 5], [5, 6, 14, 10], [8, 11, 12, 15]])
    train = Embeddings.load(m["embeddings"]["train"])
    for tokens in train.item_tokens:                          # (items, padded tokens) per training image
        assert [sorted(t[t >= 0].tolist()) for t in tokens] == [sorted(np.flatnonzero(expected == k).tolist())
                                                                  for k in range(3)]


def test_whatsup_probes_without_boxes_stop_in_one_line_saying_how_to_make_them(stand_in, tmp_path):
    cfg = make_cfg("experiment=whatsup_probes", "model=tiny_qwen2vl", f"data.whatsup_dir={stand_in}",
                   f"results_dir={tmp_path / 'results'}")
    with pytest.raises(UsageError) as err:
        run_unit(cfg, no_model)
    message = str(err.value)
    assert "\n" not in message and message.startswith("experiment=whatsup_probes trains on the tokens inside")
    assert f"`python -m data_gen.whatsup boxes data.whatsup_dir={stand_in}`" in message
    assert "then pass data.whatsup_boxes=FILE" in message
    assert not (tmp_path / "results").exists()


def test_amplification_from_saved_probes_needs_no_boxes(stand_in, tmp_path):
    """The probe is fit on the boxes' tokens only when it is fit here: with probes_from the same inputs pass."""
    base = ["model=tiny_qwen2vl", "experiment=amplification", f"data.whatsup_dir={stand_in}"]
    with pytest.raises(UsageError, match="data.whatsup_boxes"):
        check_inputs(make_cfg(*base))
    assert check_inputs(make_cfg(*base, f"probes_from={tmp_path}")) is None
