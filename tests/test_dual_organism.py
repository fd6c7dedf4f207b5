"""The dual organism's training machinery (organisms/train.py with configs/dual_organism*.yaml): each VisualMix
mode shows the LM what its docstring says, the sin/cos start of SigLIP's positions, and short runs of both phases
that save a model the loader reads back."""

import json

import numpy as np
import pytest
import torch

from common.errors import UsageError
from common.geometry import Grid, Layout, strip_box, token_indices
from data_gen.render import random_samples
from data_gen.settings import Setting
from organisms.train import VisualMix, init_residual_branches, init_vision_positions, train
from patching.ablation import Ablator
from patching.experiments import ablation, last_token, mirror_patching
from probing.run import probes
from tests.helpers import make_cfg, reproduced_card
from vlm.adapters import ADAPTERS
from vlm.models import VLM, load_model
from vlm.twins import build_parts, initialise_zero_weights


@pytest.fixture(scope="module")
def fresh():
    """The dual organism's architecture with random weights (no shipped weights needed), as training builds it."""
    cfg = make_cfg(config_name="dual_organism_phase1")
    adapter = ADAPTERS[cfg.model.family](cfg.model.modules)
    tokenizer, image_processor, config = build_parts(adapter, cfg.model, cfg.system_prompt)
    adapter.fit_image_processor(image_processor, Grid(**cfg.model.grid))
    torch.manual_seed(0)
    model = adapter.model_class._from_config(config, attn_implementation=cfg.model.attn_implementation)
    initialise_zero_weights(model, config)
    init_vision_positions(model, "sincos")
    model.eval()
    tokenizer.padding_side = "left"
    grid, layout = Grid(**cfg.model.grid), Layout(**cfg.model.layout)
    return VLM(cfg.model.name, adapter, model, tokenizer, image_processor, grid, layout, cfg.system_prompt)


def setting(name):
    return Setting.from_config(make_cfg(f"setting={name}").setting)


def test_visual_mix_modes(fresh):
    squares = setting("squares")
    samples = random_samples(squares, fresh.grid, fresh.layout, 4, seed=1)
    tokens = fresh.image_embeddings([s.image for s in samples], 4)
    embed = lambda images: fresh.image_embeddings(list(images), 8)  # noqa: E731
    settings = {"squares": squares}
    rng = np.random.default_rng(0)

    ablated = VisualMix(ablate=1.0).apply(tokens, samples, settings, fresh.grid, fresh.layout, embed, rng)
    ablator = Ablator(fresh, squares, fresh.grid, fresh.layout)
    assert torch.allclose(ablated, ablator.ablated_batch(samples), atol=1e-6)     # the experiments' ablation

    shuffled = VisualMix(shuffle=1.0).apply(tokens, samples, settings, fresh.grid, fresh.layout, embed, rng)
    assert not torch.allclose(shuffled, tokens)
    for a, b in zip(shuffled, tokens, strict=True):                                 # the same rows, elsewhere
        assert torch.allclose(a[a[:, 0].argsort()], b[b[:, 0].argsort()])

    dropped = VisualMix(drop_items=1.0).apply(tokens, samples, settings, fresh.grid, fresh.layout, embed, rng)
    empty = ablator._empty
    for k, sample in enumerate(samples):
        items = [i for item in sample.items for i in token_indices(fresh.grid, item.token_box)]
        rest = sorted(set(range(tokens.shape[1])) - set(items))
        assert torch.allclose(dropped[k, items], empty[items], atol=1e-6)
        assert torch.equal(dropped[k, rest], tokens[k, rest])

    permuted = VisualMix(permute_strips=1.0).apply(tokens, samples, settings, fresh.grid, fresh.layout, embed, rng)
    for k, sample in enumerate(samples):                # each strip's tokens, in order, at another strip's place
        strips = [token_indices(fresh.grid, strip_box(fresh.grid, fresh.layout, item.token_box, sample.orientation))
                  for item in sample.items]
        found = [order for order in VisualMix.PERMUTATIONS
                 if all(torch.equal(permuted[k, strips[p]], tokens[k, strips[q]]) for p, q in enumerate(order))]
        assert len(found) == 1
        outside = sorted(set(range(tokens.shape[1])) - {i for strip in strips for i in strip})
        assert torch.equal(permuted[k, outside], tokens[k, outside])

    assert VisualMix(0.5, 0.2, 0.4, 0.2).at(250, 500).card() == {"shuffle": 0.25, "ablate": 0.1, "drop_items": 0.2,
                                                                 "permute_strips": 0.1}
    assert VisualMix(0.5, 0.2, 0.4).at(900, 500).card()["shuffle"] == 0.5
    with pytest.raises(UsageError, match="at most 1"):
        VisualMix(shuffle=0.7, ablate=0.5)
    with pytest.raises(UsageError, match="drop_items"):
        VisualMix(drop_items=1.5)


def test_sincos_position_start_is_distinct_and_smooth(fresh):
    weight = fresh.model.model.vision_tower.embeddings.position_embedding.weight
    side = round(weight.shape[0] ** 0.5)
    table = weight.reshape(side, side, -1)
    near = (table[:, 1:] - table[:, :-1]).norm(dim=-1).mean()
    far = (table[:, :, None] - table[:, None, :]).norm(dim=-1).mean()
    assert torch.cdist(weight, weight).add(torch.eye(len(weight)) * 1e3).min() > 0.1    # every patch its own row
    assert near < far


def test_residual_start_sets_the_post_norm_gains(fresh):
    layer = fresh.adapter.decoder_layers(fresh.model)[0]
    x = torch.randn(2, 3, layer.post_attention_layernorm.weight.shape[0])
    before = layer.post_attention_layernorm(x)
    init_residual_branches(fresh.model, fresh.adapter, 0.1)
    assert torch.allclose(layer.post_attention_layernorm(x), 0.1 * before, atol=1e-6)   # gain 1 + weight
    init_residual_branches(fresh.model, fresh.adapter, 1.0)
    assert torch.allclose(layer.post_attention_layernorm(x), before, atol=1e-6)
    with pytest.raises(UsageError, match="residual_init"):
        init_residual_branches(fresh.model, fresh.adapter, 0.0)


def test_two_short_phases_save_loadable_models(tmp_path):
    first, second = tmp_path / "phase1", tmp_path / "dual"
    small = ["train.batch_size=4", "train.eval_every=2", "train.settings=[squares]"]
    card = train(make_cfg("train.steps=2", *small, f"out={first}", config_name="dual_organism_phase1"))
    assert card["steps"] == 2 and card["visual_mix"]["shuffle"] == 0.0
    card = train(make_cfg("train.steps=2", "train.mix_ramp_steps=0", *small, f"train.init_from={first}",
                          f"out={second}", config_name="dual_organism_phase2"))
    assert card["visual_mix"] == {"shuffle": 0.25, "ablate": 0.15, "drop_items": 0.3, "permute_strips": 0.35,
                                  "ramp_steps": 0}
    assert json.loads((second / "card.json").read_text())["init_from"] == str(first)
    vlm = load_model(make_cfg("model=dual_organism", f"model.path={second}"))
    assert (vlm.grid.rows, vlm.grid.cols) == (12, 12) and vlm.n_layers == 8


# --- the shipped dual organism (organisms/dual_organism/, card: organisms/dual_organism/README.md): findings
# observed with the repository's experiments, then pinned a little below what was measured ---

@pytest.fixture(scope="module")
def dual():
    return load_model(make_cfg("model=dual_organism"))


@pytest.mark.slow
def test_the_shipped_card_is_reproduced_by_its_evaluate_command():
    for name, numbers in reproduced_card("dual_organism").items():  # ... --config-name dual_organism evaluate=true
        assert numbers["accuracy"] >= 0.9, name       # finding 1 (observed 0.99 / 0.99 / 1.00)


def test_position_probes_read_the_items_place(dual, tmp_path):
    """Finding 2 (Fig 4): position probes on the visual embeddings read the items' place (observed 1.00 / 0.99
    horizontal / vertical on squares at 90 / 30 images); their strips are weak (agreement 0.40 / 0.37, the
    finding's 0.6 not reached: see the card)."""
    cfg = make_cfg("model=dual_organism", "setting=squares", "experiment=probes", f"embeddings_dir={tmp_path}")
    metrics, _ = probes(cfg, lambda: dual)
    for orientation in ("horizontal", "vertical"):
        assert metrics["probes"][orientation]["test_accuracy"] >= 0.9


def test_strip_patching_moves_the_answer_where_object_patching_does_not(dual):
    """Finding 3 (Fig 7 against Fig 6), at the visual embeddings: strip patching gives the mirror's answer, object
    patching never (observed P(swapped) 0.77 against 0.00 on squares, 16 pairs)."""
    swapped = {}
    for experiment in ("strip_patching", "object_patching"):
        cfg = make_cfg("model=dual_organism", "setting=squares", f"experiment={experiment}", "n_pairs=16",
                       "layers=[0]")
        metrics, _ = mirror_patching(cfg, lambda: dual)
        assert metrics["sites"][0] == "visual"
        swapped[experiment] = metrics["outcomes"]["swapped"]["mean"][0]
    assert swapped["strip_patching"] >= 0.6
    assert swapped["strip_patching"] - swapped["object_patching"] >= 0.2


def test_ablating_vision_ordering_drops_accuracy_but_not_to_chance(dual):
    """Finding 4 (Table 2): isolated-item and empty-image embeddings in place of its own drop accuracy, not to
    chance (observed 0.99 -> 0.58 on squares, n=96; 0.99 -> 0.75 on shapes)."""
    cfg = make_cfg("model=dual_organism", "setting=squares", "experiment=ablation", "n=96")
    metrics, _ = ablation(cfg, lambda: dual)
    assert metrics["original"]["accuracy"] >= 0.9
    assert 0.35 <= metrics["ablated"]["accuracy"] <= 0.85


def test_the_order_reaches_the_last_token_before_the_value(dual):
    """Finding 6 (Fig 2) on squares: patching the last position moves the counterfactual's ordering at a middle
    layer (observed P(b) 0.35 after layer 4) before it moves its value (P(e) 0.99 after layer 6)."""
    cfg = make_cfg("model=dual_organism", "setting=squares", "experiment=last_token", "n_pairs=16")
    metrics, _ = last_token(cfg, lambda: dual)
    ordering, value = metrics["outcomes"]["ordering"]["mean"], metrics["outcomes"]["value"]["mean"]
    peak = int(np.argmax(ordering))
    assert ordering[peak] >= 0.3
    assert value[peak] < 0.5 and max(value[peak + 1:]) >= 0.9
