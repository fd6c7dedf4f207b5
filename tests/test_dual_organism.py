"""The dual organism's training machinery (organisms/train.py with configs/dual_organism*.yaml): each VisualMix
mode shows the LM what its docstring says, the sin/cos start of SigLIP's positions, and short runs of both phases
that save a model the loader reads back."""


import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.errors import UsageError
from common.geometry import Grid, Layout, strip_box, token_indices
from common.results import REPO
from data_gen.render import random_samples
from data_gen.settings import Setting
from organisms.mix import VisualMix
from organisms.model import init_residual_branches, init_vision_positions
from organisms.train import Trainee, phases, train
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
    cfg = make_cfg(config_name="dual_organism")
    adapter = ADAPTERS[cfg.model.family](cfg.model.modules)
    tokenizer, image_processor, config = build_parts(adapter, cfg.model, cfg.system_prompt)
    adapter.fit_image_processor(image_processor, Grid(**cfg.model.grid))
    torch.manual_seed(0)
    model = adapter.model_class._from_config(config, attn_implementation=cfg.model.attn_implementation)
    initialise_zero_weights(model, config)
    init_vision_positions(model, adapter, "sincos")
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

    def mixed(mix):
        return mix.apply(tokens, samples, mix.choose(rng, len(samples)), settings, fresh.grid, fresh.layout, embed, rng)

    ablated = mixed(VisualMix(ablate=1.0))
    ablator = Ablator(fresh, squares, fresh.grid, fresh.layout)
    assert torch.allclose(ablated, ablator.ablated_batch(samples), atol=1e-6)     # the experiments' ablation

    flat = mixed(VisualMix(ablate=1.0, flat_background=True))          # the same items on a placeless background
    for k, sample in enumerate(samples):
        items = [i for item in sample.items for i in token_indices(fresh.grid, item.token_box)]
        rest = sorted(set(range(tokens.shape[1])) - set(items))
        assert torch.allclose(flat[k, items], ablated[k, items])
        assert torch.allclose(flat[k, rest], ablator._empty.mean(0).expand(len(rest), -1), atol=1e-6)

    shuffled = mixed(VisualMix(shuffle=1.0))
    assert not torch.allclose(shuffled, tokens)
    for a, b in zip(shuffled, tokens, strict=True):                                 # the same rows, elsewhere
        assert torch.allclose(a[a[:, 0].argsort()], b[b[:, 0].argsort()])

    dropped = mixed(VisualMix(drop_items=1.0))
    empty = ablator._empty
    for k, sample in enumerate(samples):
        items = [i for item in sample.items for i in token_indices(fresh.grid, item.token_box)]
        rest = sorted(set(range(tokens.shape[1])) - set(items))
        assert torch.allclose(dropped[k, items], empty[items], atol=1e-6)
        assert torch.equal(dropped[k, rest], tokens[k, rest])

    spread = mixed(VisualMix(drop_items=1.0, drop_strips=0.5))     # part of each strip goes with its item
    for k, sample in enumerate(samples):
        strips = {i for item in sample.items
                  for i in token_indices(fresh.grid, strip_box(fresh.grid, fresh.layout, item.token_box,
                                                                sample.orientation))}
        emptied = {i for i in range(tokens.shape[1]) if torch.allclose(spread[k, i], empty[i], atol=1e-6)
                   and not torch.allclose(tokens[k, i], empty[i], atol=1e-6)}
        kept = {i for i in range(tokens.shape[1]) if torch.equal(spread[k, i], tokens[k, i])}
        assert emptied <= strips and len(kept | emptied) == tokens.shape[1]
        assert 0.3 < len(emptied & strips) / len(strips) < 0.7

    permuted = mixed(VisualMix(permute_strips=1.0))
    for k, sample in enumerate(samples):                # each strip's tokens, in order, at another strip's place
        strips = [token_indices(fresh.grid, strip_box(fresh.grid, fresh.layout, item.token_box, sample.orientation))
                  for item in sample.items]
        found = [order for order in VisualMix.PERMUTATIONS
                 if all(torch.equal(permuted[k, strips[p]], tokens[k, strips[q]]) for p, q in enumerate(order))]
        assert len(found) == 1
        outside = sorted(set(range(tokens.shape[1])) - {i for strip in strips for i in strip})
        assert torch.equal(permuted[k, outside], tokens[k, outside])

    assert VisualMix(0.5, 0.2, 0.4, 0.2, 0.5).at(250, 500).card() == {
        "shuffle": 0.25, "ablate": 0.1, "drop_items": 0.2, "permute_strips": 0.1, "drop_strips": 0.5,
        "flat_background": False}
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


def short_run(tmp_path, *overrides, steps=2):
    """The dual organism's command with every phase cut to `steps` steps of 4 questions on squares."""
    cfg = make_cfg(config_name="dual_organism")
    cut = [f"phases.{name}.steps={steps}" for name in cfg.phases]
    return make_cfg(*cut, "train.batch_size=4", "train.settings=[squares]", f"out={tmp_path / 'dual'}", *overrides,
                    config_name="dual_organism")


# the losses of every step of `short_run` (recorded on the 2-core CPU that trained the shipped weights; a change
# to the recipe, the data or the trainer changes them: record them again, with the card's pilots in mind)
RECORDED_LOSSES = [[5.770869, 5.742155], [5.731803, 5.501757], [5.707514, 5.609208]]


def test_a_short_run_of_every_phase_gives_the_recorded_losses_and_a_card_without_machine_paths(tmp_path):
    cfg = short_run(tmp_path)
    card = train(cfg, "python -m organisms.train --config-name dual_organism")
    assert [p["name"] for p in card["phases"]] == list(cfg.phases)
    assert [p["steps"] for p in card["phases"]] == [2] * len(cfg.phases)
    losses = [loss for p in card["phases"] for loss in p["losses"]]
    assert losses == pytest.approx([loss for phase in RECORDED_LOSSES for loss in phase], rel=1e-4, abs=1e-5)
    text = (tmp_path / "dual" / "card.json").read_text()
    assert str(REPO) not in text and str(tmp_path) not in text and '": "/' not in text
    assert card["command"] == "python -m organisms.train --config-name dual_organism"
    assert card["finished"] and card["started_from"] == "scratch"
    assert set(card["versions"]) >= {"torch", "transformers"} and card["git_commit"]
    vlm = load_model(make_cfg("model=dual_organism", f"model.path={tmp_path / 'dual'}"))
    assert (vlm.grid.rows, vlm.grid.cols) == (12, 12) and vlm.n_layers == 8


def test_ablated_images_train_only_the_first_layers_they_are_routed_to(tmp_path):
    """train.ablate_layers = k: a batch of ablated images gives gradients to the LM's first k decoder layers only;
    a batch of images as drawn reaches the vision tower too."""
    cfg = short_run(tmp_path)
    plan = phases(cfg)
    torch.manual_seed(0)
    trainee = Trainee(cfg, plan[0][1])
    images = trainee.questions.draw(np.random.default_rng(0), 2, False)
    layers = list(trainee.adapter.decoder_layers(trainee.model))
    routed = OmegaConf.merge(plan[0][1], {"ablate_layers": 2})
    trainee.step_loss(images, VisualMix(ablate=1.0), np.random.default_rng(0), routed)
    touched = {id(p) for p in trainee.model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    first = {id(p) for layer in layers[:2] for p in layer.parameters()}
    assert touched <= first and len(touched) > len(first) / 2
    trainee.model.zero_grad(set_to_none=True)
    trainee.step_loss(images, VisualMix(), np.random.default_rng(0), routed)
    vision = trainee.adapter.vision_position_embedding(trainee.model).weight
    assert vision.grad is not None and layers[-1].self_attn.q_proj.weight.grad is not None


def test_phases_refuse_unknown_keys_and_phases(tmp_path):
    with pytest.raises(UsageError, match="phase fade sets colour"):
        phases(short_run(tmp_path, "+phases.fade.colour=1"))
    with pytest.raises(UsageError, match="from_phase=last is not a phase"):
        phases(short_run(tmp_path, "from_phase=last"))
    assert [name for name, _ in phases(short_run(tmp_path, "from_phase=fade"))] == ["fade"]


@pytest.mark.parametrize("flag", [["--config-name", "dual_organism"], ["--config-name=dual_organism"],
                                  ["-cn", "dual_organism"]])
def test_the_command_line_checks_keys_against_the_config_it_names(flag, capsys):
    """`--config-name dual_organism`: a phase's key is a key of that config (not of configs/organism.yaml, the
    command's own), and an unknown one is refused in one line naming it, before anything trains."""
    from organisms.train import main

    assert main([*flag, "phases.fade.drop_items=0.8", "+phases.fade.offsets=true", "train.colour=1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "'train.colour'" in error and "drop_items" not in error
    assert main([*flag, "+phases.fade.colour=1"]) == 2          # organisms.train.phases: not a train key
    assert capsys.readouterr().err.strip() == (
        "error: phase fade sets colour, not train keys; allowed: " + ", ".join(sorted(make_cfg(
            config_name="dual_organism").train)))


# --- the shipped dual organism (organisms/dual_organism/, card: organisms/dual_organism/README.md): findings
# observed with the repository's experiments, then pinned a little below what was measured ---

@pytest.fixture(scope="module")
def dual():
    return load_model(make_cfg("model=dual_organism"))


@pytest.mark.slow
def test_the_shipped_card_is_reproduced_by_its_evaluate_command():
    for name, numbers in reproduced_card("dual_organism").items():  # ... --config-name dual_organism evaluate=true
        assert numbers["accuracy"] >= 0.9, name       # finding 1 (observed 0.96 / 0.95 / 0.99)


@pytest.mark.parametrize("setting", ["squares", "shapes", "objects"])
def test_position_probes_read_the_items_place_and_their_strips(dual, tmp_path, setting):
    """Finding 2 (Fig 4): position probes on the visual embeddings read the items' place (observed 1.00 on every
    setting and orientation at 90 / 30 images), and the background tokens of a strip as their item's place
    (strip agreement, horizontal / vertical: 0.75 / 0.80 squares, 0.81 / 0.82 shapes, 0.91 / 0.81 objects)."""
    cfg = make_cfg("model=dual_organism", f"setting={setting}", "experiment=probes", f"embeddings_dir={tmp_path}")
    metrics, _ = probes(cfg, lambda: dual)
    for orientation in ("horizontal", "vertical"):
        assert metrics["probes"][orientation]["test_accuracy"] >= 0.9
        assert metrics["probes"][orientation]["strip_agreement"] >= 0.6


def test_strip_patching_moves_the_answer_where_object_patching_does_not(dual):
    """Finding 3 (Fig 7 against Fig 6), at the visual embeddings: strip patching gives the mirror's answer, object
    patching much less (observed P(swapped) 0.88 against 0.33 on squares, 16 pairs)."""
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
    chance (observed 0.98 -> 0.45 on squares, n=96; the paper's chance: one of 3 items, 0.33)."""
    cfg = make_cfg("model=dual_organism", "setting=squares", "experiment=ablation", "n=96")
    metrics, _ = ablation(cfg, lambda: dual)
    assert metrics["original"]["accuracy"] >= 0.9
    assert 0.35 <= metrics["ablated"]["accuracy"] <= 0.85


def test_the_order_reaches_the_last_token_before_the_value(dual):
    """Finding 6 (Fig 2) on squares: patching the last position moves the counterfactual's ordering at an early
    layer (observed P(b) 0.84 after layer 0 of 8) before it moves its value (P(e) 0.85 after layer 1, 0.96 at the
    end)."""
    cfg = make_cfg("model=dual_organism", "setting=squares", "experiment=last_token", "n_pairs=16")
    metrics, _ = last_token(cfg, lambda: dual)
    ordering, value = metrics["outcomes"]["ordering"]["mean"], metrics["outcomes"]["value"]["mean"]
    peak = int(np.argmax(ordering))
    assert ordering[peak] >= 0.3
    assert value[peak] < 0.5 and max(value[peak + 1:]) >= 0.9
