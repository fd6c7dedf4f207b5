"""The patching experiments on the twins: properties any correct experiment must have, the CLI's bad input,
and the figures redrawn from saved results."""

from pathlib import Path

import numpy as np
import pytest
import torch

import runner
from common.geometry import line_boxes, token_indices
from common.results import load_unit, unit_dir
from data_gen.pairs import empty_image, isolated_middle_image, mirror_pairs
from data_gen.render import random_samples
from data_gen.settings import Setting
from patching.ablation import Ablator
from patching.engine import PatchingEngine
from patching.experiments import ablation, last_token, mirror_patching, mirror_plan
from runner import run_unit
from tests.helpers import make_cfg, run_plot
from vlm.interventions import VISUAL
from vlm.scoring import AnswerScorer, score_samples

REPO = Path(__file__).resolve().parent.parent


def experiment_cfg(twin, experiment, *overrides):
    return make_cfg(f"model={twin.name}", f"experiment={experiment}", *overrides)


def test_last_token_patch_after_the_last_layer_gives_the_counterfactual(twin):
    """After the last layer the last position's residual is all the logits see: every outcome there must equal
    the unpatched counterfactual run's, for every pair."""
    cfg = experiment_cfg(twin, "last_token", "n_pairs=4", "batch_size=3")
    metrics, arrays = last_token(cfg, lambda: twin)
    assert metrics["sites"] == [str(layer) for layer in range(twin.n_layers)]
    for outcome in ("clean", "ordering", "value"):
        assert arrays[f"p_{outcome}"].shape == (4, twin.n_layers)
        np.testing.assert_allclose(arrays[f"p_{outcome}"][:, -1], arrays[f"p_{outcome}_unpatched_counterfactual"],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(metrics["outcomes"][outcome]["mean"], arrays[f"p_{outcome}"].mean(0), rtol=1e-6)
    assert set(arrays["direction"]) == {"left", "right", "above", "below"}


def test_patching_the_prompts_last_word_after_the_last_layer_changes_nothing(twin):
    """Only the last position's final residual reaches the logits: patching an earlier position after the last
    layer must leave every outcome at the unpatched clean run's."""
    cfg = experiment_cfg(twin, "last_token", "n_pairs=2", "patch_position=prompt_end", f"layers=[0,{twin.n_layers - 1}]")
    metrics, arrays = last_token(cfg, lambda: twin)
    assert metrics["patch_position"] == "prompt_end" and (arrays["from_end"] > 0).all()
    for outcome in ("clean", "ordering", "value"):
        np.testing.assert_allclose(arrays[f"p_{outcome}"][:, -1], arrays[f"p_{outcome}_unpatched_clean"],
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("orientation", ["horizontal", "vertical"])
def test_mirror_plan_swaps_the_two_sides(twin, orientation):
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 0, orientations=(orientation,))[0]
    items = mirror_plan(twin.grid, pair, "items")
    left, right = (token_indices(twin.grid, pair.clean.items[k].token_box) for k in (0, 2))
    assert items.dst_tokens == left + right and items.src_tokens == right + left
    strips = mirror_plan(twin.grid, pair, "strips")
    side = twin.grid.rows if orientation == "horizontal" else twin.grid.cols
    assert len(strips.dst_tokens) == 2 * side * twin.layout.strip_tokens
    assert set(left) <= set(strips.dst_tokens) and set(right) <= set(strips.dst_tokens)
    # the two images differ only inside the patched strips (the vision tower mixes tokens, so this is checked in
    # pixels: the token cells whose pixels differ)
    ppt = twin.grid.pixels_per_token
    diff = (np.asarray(pair.clean.image) != np.asarray(pair.counterfactual.image)).any(-1)
    cells = diff.reshape(twin.grid.rows, ppt, twin.grid.cols, ppt).any((1, 3))
    differs = set(np.flatnonzero(cells).tolist())
    assert set(left) | set(right) <= differs <= set(strips.dst_tokens)


def test_ablated_embeddings_hold_items_not_positions(twin):
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 5)[0]
    ablator = Ablator(twin, setting, twin.grid, twin.layout)
    clean, mirror = ablator.ablated(pair.clean), ablator.ablated(pair.counterfactual)
    grid, orientation = twin.grid, pair.clean.orientation
    middle = token_indices(grid, line_boxes(grid, twin.layout, orientation)[1])
    first = pair.clean.items[0]
    alone = isolated_middle_image(setting, grid, twin.layout, orientation, first.name)
    torch.testing.assert_close(clean[token_indices(grid, first.token_box)],
                               twin.image_embeddings([alone.image], 1)[0, middle])
    left, right = (token_indices(grid, pair.clean.items[k].token_box) for k in (0, 2))
    torch.testing.assert_close(clean[left], mirror[right])          # item a, wherever it stands
    original = twin.visual_tokens(twin.encode([pair.clean.image], [pair.clean.prompt]))[0]
    assert not torch.allclose(clean[left], original[left], atol=1e-4)
    item_tokens = {k for item in pair.clean.items for k in token_indices(grid, item.token_box)}
    background = [k for k in range(grid.n_tokens) if k not in item_tokens]
    empty = twin.image_embeddings([empty_image(grid)], 1)[0]
    torch.testing.assert_close(clean[background], empty[background])
    # so swapping the side items' ablated embeddings leaves the clean run as it was
    scorer = AnswerScorer(twin.tokenizer, setting.candidates)
    run = PatchingEngine(twin, scorer).run_pair(pair.clean, pair.counterfactual, mirror_plan(grid, pair, "items"),
                                                [VISUAL], clean[None], mirror[None])
    torch.testing.assert_close(run.patched[0], run.clean, rtol=1e-5, atol=1e-6)


def test_ablation_scores_original_images_like_the_accuracy_experiment(twin):
    cfg = experiment_cfg(twin, "ablation", "n=8", "batch_size=4")
    setting = Setting.from_config(cfg.setting)
    metrics, arrays = ablation(cfg, lambda: twin)
    samples = random_samples(setting, twin.grid, twin.layout, 8, cfg.seed)
    probs, _ = score_samples(twin, AnswerScorer(twin.tokenizer, setting.candidates), samples, 4)
    np.testing.assert_allclose(arrays["probs_original"], probs, rtol=1e-4, atol=1e-6)
    assert arrays["probs_ablated"].shape == probs.shape
    assert metrics["original"]["n"] == metrics["ablated"]["n"] == 8


def test_strip_patching_runs_end_to_end_and_redraws(tmp_path, twin):
    cfg = experiment_cfg(twin, "strip_patching", "n_pairs=2", f"results_dir={tmp_path}")
    run_unit(cfg)
    record, arrays = load_unit(unit_dir(cfg))
    assert record["metrics"]["sites"] == ["visual", *map(str, range(twin.n_layers))]
    assert arrays["p_swapped"].shape == (2, twin.n_layers + 1)
    out = tmp_path / "figure"
    assert run_plot("fig07_strip_patching", "--results", str(tmp_path), "--out", str(out)) == 0
    assert (out / "strip_patching.png").stat().st_size > 0 and (out / "summary.md").exists()


def test_ablated_patching_has_layer_sites_only(twin):
    cfg = experiment_cfg(twin, "ablated_patching", "n_pairs=2", "layers=[0]")
    metrics, arrays = mirror_patching(cfg, lambda: twin)
    assert metrics["sites"] == ["0"] and metrics["ablated"] and arrays["p_clean"].shape == (2, 1)


@pytest.mark.parametrize("args,needle", [
    (["experiment=last_token", "n_pairs=1", "layers=[0,99]"], "layer 99"),
    (["experiment=last_token", "n_pairs=1", "patch_visual=true"], "patch_visual"),
    (["experiment=no_such_experiment"], "no_such_experiment"),
    (["experiment=ablation", "setting=whatsup"], "does not run on setting"),
    (["experiment=last_token", "setting=whatsup"], "data.whatsup_dir is not set"),
    (["experiment=object_patching", "n_pairs=1", "region=strips"], "unknown key 'region'"),   # the function decides
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle, capsys):
    code = runner.main(["model=tiny_qwen2vl", "device=cpu", f"results_dir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_plot_without_results_is_an_error(tmp_path, capsys):
    code = run_plot("fig02_last_token", "--results", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == 2 and "no last_token results" in capsys.readouterr().err
