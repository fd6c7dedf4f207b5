"""Probes: planted directions are recovered and their strips show in the heat maps; the whole path on both
twins; the embedding cache equals VLM.visual_tokens; saved probes load back; bad input is one clear error."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import runner
from common.geometry import Grid, Layout, grid_boxes, line_boxes, strip_box, token_indices
from common.results import load_unit, save_unit, unit_dir
from data_gen.settings import Setting
from probing.extract import Embeddings, arrangement_samples, load_or_extract, split_path
from probing.heatmaps import heat_map, nearest_item_labels, strip_agreement, token_probabilities
from probing.plots import draw_figure
from probing.probes import fit_probe, item_examples, load_probe
from runner import run_unit
from tests.helpers import load_twin, make_cfg, run_command, run_plot

REPO = Path(__file__).resolve().parent.parent
QWEN_GRID, QWEN_LAYOUT = Grid(12, 12, 28), Layout(2, 2, 4)


def planted_split(rng, n_images, directions, orientation="horizontal", noise=0.3):
    """Embeddings (n_images, 144, hidden) of a Qwen-geometry line whose every token carries the direction of
    its strip's position (the strips of common.geometry.strip_box), plus a random per-item content vector
    and noise. Returns (tokens, item_tokens (n, 3, 4), labels (n, 3), boxes (3, 4), planted map (12, 12))."""
    boxes = line_boxes(QWEN_GRID, QWEN_LAYOUT, orientation)
    planted = np.zeros((12, 12), int)
    for position, box in enumerate(boxes):
        row0, col0, row1, col1 = strip_box(QWEN_GRID, QWEN_LAYOUT, box, orientation)
        planted[row0:row1, col0:col1] = position
    hidden = directions.shape[1]
    tokens = noise * rng.normal(size=(n_images, 144, hidden)) + 2.0 * directions[planted.reshape(-1)]
    item_tokens = np.array([token_indices(QWEN_GRID, box) for box in boxes])
    for i in range(n_images):
        for k in range(3):
            tokens[i, item_tokens[k]] += rng.normal(size=hidden)        # the item's "color", random per image
    return tokens, np.broadcast_to(item_tokens, (n_images, 3, 4)), np.tile([0, 1, 2], (n_images, 1)), \
        np.array(boxes), planted


@pytest.mark.parametrize("orientation,axes", [("horizontal", ("col",)), ("vertical", ("row",))])
def test_probe_recovers_planted_direction_and_strips(orientation, axes):
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(3, 32))
    train = planted_split(rng, 90, directions, orientation)
    tokens, item_tokens, labels, boxes, planted = planted_split(rng, 30, directions, orientation)
    probe = fit_probe(*item_examples(*train[:3]), C=1.0)

    x, y = item_examples(tokens, item_tokens, labels)
    assert x.shape == (30 * 12, 32) and (probe.predict(x) == y).mean() == 1.0
    cos = probe.directions() @ (directions - directions.mean(0)).T
    assert (cos.argmax(1) == [0, 1, 2]).all()

    probs = token_probabilities(probe, tokens)
    predicted = probe.classes[probs.argmax(-1)]
    mean_prob, argmax_map, agreement = heat_map(predicted, probs, probe.classes, (12, 12))
    assert mean_prob.shape == (3, 12, 12) and np.allclose(mean_prob.sum(0), 1, atol=1e-5)
    assert (argmax_map == planted).all() and (agreement > 0.9).all()
    expected = nearest_item_labels((12, 12), boxes, [0, 1, 2], axes)
    on_items = expected == -1
    assert on_items.sum() == 12 and (expected[~on_items] == planted.reshape(-1)[~on_items]).all()
    score, counted = strip_agreement(predicted, np.tile(expected, (30, 1)))
    assert score == 1.0 and counted == 30 * (144 - 12)
    # a probe that sees only the items, not the strips: background tokens no longer agree
    shuffled = np.tile(expected, (30, 1))
    shuffled[shuffled >= 0] = (shuffled[shuffled >= 0] + 1) % 3
    assert strip_agreement(predicted, shuffled)[0] == 0.0


def test_nearest_item_leaves_out_ties_and_items():
    # Gemma geometry: 3-token items with 3-token gaps at cols [0,3), [6,9), [12,15); cols 4 and 10 are tied
    boxes = line_boxes(Grid(16, 16, 56), Layout(3, 3, 3), "horizontal")
    nearest = nearest_item_labels((16, 16), boxes, [0, 1, 2], ("col",)).reshape(16, 16)
    assert nearest[0].tolist() == [0, 0, 0, 0, -1, 1, 1, 1, 1, 1, -1, 2, 2, 2, 2, 2]
    assert (nearest[boxes[1][0]:boxes[1][2], 6:9] == -1).all()
    # 2 x 2 grid, row labels: the top half is row 0 even beside the items; the items themselves are left out
    grid_2x2 = [box for row in grid_boxes(QWEN_GRID, QWEN_LAYOUT, 2) for box in row]     # rows [3,5), [7,9)
    rows = nearest_item_labels((12, 12), grid_2x2, [0, 0, 1, 1], ("row",)).reshape(12, 12)
    assert (rows[:6, 0] == 0).all() and (rows[6:, 0] == 1).all() and rows[3, 3] == -1 and rows[3, 0] == 0
    cells = nearest_item_labels((12, 12), grid_2x2, [0, 1, 2, 3], ("row", "col")).reshape(12, 12)
    assert cells[0, 0] == 0 and cells[11, 11] == 3 and cells[0, 11] == 1 and cells[11, 0] == 2


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_probabilities_match_sklearn_and_survive_a_results_unit(tmp_path, n_classes):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(120, 8)) * rng.uniform(0.5, 5, size=8) + 3, rng.integers(0, n_classes, 120)
    probe = fit_probe(x, y, C=0.5)
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(C=0.5, max_iter=1000).fit(scaler.transform(x), y)
    assert np.allclose(probe.probabilities(x), reference.predict_proba(scaler.transform(x)), atol=1e-5)
    assert probe.weight.shape == (n_classes, 8) and probe.classes.tolist() == list(range(n_classes))

    save_unit(tmp_path / "unit", {}, probe.to_arrays("horizontal"), make_cfg())
    loaded = load_probe(tmp_path / "unit", "horizontal")
    assert np.array_equal(loaded.probabilities(x), probe.probabilities(x))
    d = loaded.directions()
    assert np.allclose(np.linalg.norm(d, axis=1), 1)
    raw = loaded.directions(unit=False)
    assert np.allclose(raw, probe.weight / probe.scale)
    # moving x along a class's raw direction raises that class's logit by the step times |raw|
    step = loaded.logits(x[:1] + 0.1 * d[0]) - loaded.logits(x[:1])
    assert np.isclose(step[0, 0], 0.1 * np.linalg.norm(raw[0]), rtol=1e-4)


def test_extraction_cache_round_trip_equals_visual_tokens(twin, tmp_path):
    cfg = make_cfg(f"model={twin.name}", "experiment=probes", f"embeddings_dir={tmp_path}",
                   "embedding_dtype=float32", "batch_size=2")
    setting = Setting.from_config(cfg.setting)
    calls = []

    def get_vlm():
        calls.append(1)
        return twin

    emb, path = load_or_extract(cfg, setting, "vertical", 2, 5, get_vlm)
    samples = arrangement_samples(setting, twin.grid, twin.layout, "vertical", cfg.seed, 0, 5)[2:]
    direct = twin.visual_tokens(twin.encode([s.image for s in samples], [setting.prompt("above", "red")] * 3))
    assert np.allclose(Embeddings.load(path).tokens, direct.numpy(), atol=1e-5)
    assert emb.tokens.shape == (3, twin.grid.n_tokens, direct.shape[-1]) and calls == [1]
    assert emb.image_id.tolist() == [s.id for s in samples] and set(emb.orientation) == {"vertical"}
    assert emb.item_position[..., 0].tolist() == [[0, 1, 2]] * 3
    for box, tokens in zip(emb.item_box[0], emb.item_tokens[0], strict=True):
        assert tokens.tolist() == token_indices(twin.grid, tuple(box))
    assert emb.first_image.shape == (twin.grid.height, twin.grid.width, 3)

    again, _ = load_or_extract(cfg, setting, "vertical", 2, 5, get_vlm)           # cached: no model needed
    assert calls == [1] and np.array_equal(again.tokens, emb.tokens)
    half = make_cfg(f"model={twin.name}", "experiment=probes", f"embeddings_dir={tmp_path}", "embedding_dtype=float16")
    small, _ = load_or_extract(half, setting, "vertical", 2, 5, get_vlm)          # another key: extracted again
    assert calls == [1, 1] and small.tokens.dtype == np.float16
    assert np.allclose(small.tokens, emb.tokens, atol=1e-3) and not list(tmp_path.rglob("*.tmp"))


def test_probes_run_on_twins_resume_and_refit_without_model(twin, tmp_path, monkeypatch, capsys):
    args = [f"model={twin.name}", "experiment=probes", "setting=squares", "n_train=4", "n_test=2",
            f"results_dir={tmp_path / 'results'}", f"embeddings_dir={tmp_path / 'emb'}"]
    monkeypatch.setattr("vlm.models.load_model", lambda cfg: twin)
    cfg = make_cfg(*args)
    run_unit(cfg)
    out = unit_dir(cfg)
    record, arrays = load_unit(out)
    rows, cols = twin.grid.rows, twin.grid.cols
    per_item = twin.layout.item_tokens ** 2
    for orientation in ("horizontal", "vertical"):
        m = record["metrics"]["probes"][orientation]
        assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["strip_agreement"] <= 1
        assert m["n_test_tokens"] == 2 * 3 * per_item and m["n_train_tokens"] == 4 * 3 * per_item
        assert arrays[f"{orientation}.mean_prob"].shape == (3, rows, cols)
        assert np.allclose(arrays[f"{orientation}.mean_prob"].sum(0), 1, atol=1e-5)
        assert arrays[f"{orientation}.argmax_map"].shape == (rows, cols)
        assert (arrays[f"{orientation}.item_map"] >= 0).sum() == 3 * per_item
        assert arrays[f"{orientation}.confusion"].sum() == m["n_test_tokens"]
        assert arrays[f"{orientation}.example_image"].shape == (twin.grid.height, twin.grid.width, 3)
        assert set(arrays[f"{orientation}.test_image_id"]).isdisjoint(arrays[f"{orientation}.train_image_id"])
        assert load_probe(out, orientation).directions().shape == (3, twin.model.config.text_config.hidden_size)

    stamp = (out / "metrics.json").stat().st_mtime_ns
    run_unit(cfg)
    assert "skipping" in capsys.readouterr().out and (out / "metrics.json").stat().st_mtime_ns == stamp

    def no_model(cfg):
        raise AssertionError("the embeddings are cached; the model must not load")

    monkeypatch.setattr("vlm.models.load_model", no_model)
    refit = make_cfg(*args, f"results_dir={tmp_path / 'refit'}")
    run_unit(refit)
    _, again = load_unit(unit_dir(refit))
    assert np.array_equal(again["horizontal.weight"], arrays["horizontal.weight"])

    assert draw_figure(tmp_path / "results", tmp_path / "fig", "probes", lambda m: "", "x") == 0
    assert (tmp_path / "fig" / f"probes_{twin.name}_squares.png").stat().st_size > 0


def test_grid_probes_on_a_twin(tmp_path, monkeypatch):
    twin = load_twin("tiny_qwen2vl")
    monkeypatch.setattr("vlm.models.load_model", lambda cfg: twin)
    cfg = make_cfg("model=tiny_qwen2vl", "experiment=grid_probes", "n_train=3", "n_test=2",
                   f"results_dir={tmp_path / 'results'}", f"embeddings_dir={tmp_path / 'emb'}")
    assert cfg.setting.name == "shapes"
    run_unit(cfg)
    record, arrays = load_unit(unit_dir(cfg))
    probes = record["metrics"]["probes"]
    assert list(probes) == [f"{n}x{n}_{t}" for n in (2, 3) for t in ("row", "col", "cell")]
    for name, k in [("2x2_row", 2), ("2x2_cell", 4), ("3x3_col", 3), ("3x3_cell", 9)]:
        assert probes[name]["classes"] == list(range(k))
        assert arrays[f"{name}.mean_prob"].shape == (k, 12, 12)
        assert (arrays[f"{name}.item_map"] >= 0).sum() == int(name[0]) ** 2 * 4
    assert probes["3x3_cell"]["n_test_tokens"] == 2 * 9 * 4
    assert arrays["2x2_row.item_map"][3:5, 3:5].tolist() == [[0, 0], [0, 0]]
    assert load_probe(unit_dir(cfg), "3x3_cell").directions().shape == (9, 64)
    assert draw_figure(tmp_path / "results", tmp_path / "fig", "grid_probes", lambda m: m["arrangement"], "x") == 0
    assert sorted(p.name for p in (tmp_path / "fig").glob("*.png")) == \
        ["grid_probes_tiny_qwen2vl_shapes_2x2.png", "grid_probes_tiny_qwen2vl_shapes_3x3.png"]


@pytest.mark.parametrize("args,needle", [
    (["orientations=[diagonal]"], "diagonal"),
    (["n_train=0"], "n_train=0"),
    (["n_train=100", "n_test=30"], "only 120 distinct horizontal"),
    (["experiment=grid_probes", "grid_sizes=[7]"], "7 x 7"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, args, needle):
    proc = run_command(runner.main, "experiment=probes", "model=tiny_qwen2vl", "setting=squares", "device=cpu", *args,
                       f"results_dir={tmp_path / 'results'}", f"embeddings_dir={tmp_path / 'emb'}")
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")
    assert not (tmp_path / "results").exists() and not (tmp_path / "emb").exists()


@pytest.mark.parametrize("figure", ["fig04_probes", "fig31_grid_probes"])
def test_plot_without_results_is_one_clear_error(tmp_path, figure):
    proc = run_command(lambda argv: run_plot(figure, *argv), "--results", str(tmp_path / "none"),
                       "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_split_files_are_disjoint_slices_of_distinct_arrangements():
    cfg = make_cfg("model=tiny_qwen2vl", "experiment=probes")
    setting = Setting.from_config(cfg.setting)
    everything = arrangement_samples(setting, QWEN_GRID, QWEN_LAYOUT, "horizontal", 0, 0, 120)
    names = [tuple(i.name for i in s.items) for s in everything]
    assert len(set(names)) == 120                     # every ordered triple of the 6 squares, once
    test = arrangement_samples(setting, QWEN_GRID, QWEN_LAYOUT, "horizontal", 0, 90, 120)
    assert [s.id for s in test] == [s.id for s in everything[90:]]
    assert split_path(cfg, setting, "horizontal", 90, 120).name == "horizontal_seed0_90-120.npz"
