"""The intervention layer (vlm/interventions.py) on both twins: each intervention against the tensor operation it
names, the two routes of a "visual" edit (hooked vs. given embeddings) equal, per-head sites, reads, and bad
sites refused."""

import pytest
import torch

from common.cli import REPO_DIR as REPO
from data_gen.render import random_samples
from data_gen.settings import Setting
from tests.helpers import make_cfg
from vlm.interventions import (
    VISUAL,
    Add,
    Apply,
    Read,
    Replace,
    Set,
    SiteError,
    heads_site,
    intervene,
    layer_site,
    site_module,
)


def two_inputs(vlm):
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    samples = random_samples(setting, vlm.grid, vlm.layout, 2, seed=7)
    return [vlm.encode([s.image], [s.prompt]) for s in samples]


def test_visual_edits_give_the_same_logits_hooked_or_on_given_embeddings(twin):
    """Replace / Add / Apply at "visual": hooked into a forward that runs the vision tower, or applied to
    embeddings given to the forward (tower skipped), the logits are the same; and each equals the edited tensor
    passed in by hand."""
    clean, other = two_inputs(twin)
    tokens, source = twin.visual_tokens(clean), twin.visual_tokens(other)
    swap = list(range(0, twin.n_visual_tokens, 2))                  # every other token, from the other image
    delta = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))
    by_hand = {
        "replace": (Replace(VISUAL, swap, source, swap[::-1]), tokens.clone().index_copy(1, torch.tensor(swap),
                                                                                         source[:, swap[::-1]])),
        "add": (Add(VISUAL, delta), tokens + delta),
        "apply": (Apply(VISUAL, lambda t: t.flip(1)), tokens.flip(1)),
    }
    plain = twin.last_logits(clean)
    for name, (intervention, edited) in by_hand.items():
        expected = twin.last_logits(clean, edited)
        hooked = twin.last_logits(clean, interventions=[intervention])
        given = twin.last_logits(clean, tokens, [intervention])
        torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(given, expected, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert float((expected - plain).abs().max()) > 1e-4, name
    # Set first: the given embeddings, tower skipped; the later edits apply to them
    both = twin.last_logits(clean, interventions=[Set(VISUAL, source), Add(VISUAL, delta)])
    torch.testing.assert_close(both, twin.last_logits(clean, source + delta), rtol=1e-5, atol=1e-5)


def test_layer_edits_and_reads_are_the_residual_stream(twin):
    """A Read of "layer.<l>" is the output the next layer receives; Replace of every position from another run's
    read gives that run's logits; Add of zero is the identity."""
    clean, other = two_inputs(twin)
    assert clean["input_ids"].shape == other["input_ids"].shape
    layer = twin.n_layers // 2
    with intervene(twin, [Read(layer_site(layer))]) as read:
        other_logits = twin.last_logits(other)
    everything = list(range(other["input_ids"].shape[1]))
    swapped = twin.last_logits(clean, interventions=[Replace(layer_site(layer), everything, read[layer_site(layer)],
                                                             everything)])
    torch.testing.assert_close(swapped, other_logits, rtol=1e-5, atol=1e-5)
    zero = torch.zeros(read[layer_site(layer)].shape[-1])
    torch.testing.assert_close(twin.last_logits(clean, interventions=[Add(layer_site(layer), zero)]),
                               twin.last_logits(clean), rtol=0, atol=0)


def test_interventions_at_one_site_apply_in_order(twin):
    clean, _ = two_inputs(twin)
    tokens = twin.visual_tokens(clean)
    seen = []
    with intervene(twin, [Read(VISUAL), Add(VISUAL, torch.ones(tokens.shape[-1])),
                          Apply(VISUAL, lambda t: seen.append(t.clone()))]) as read:
        twin.last_logits(clean)
    torch.testing.assert_close(read[VISUAL], tokens, rtol=0, atol=0)
    torch.testing.assert_close(seen[0], tokens + 1, rtol=1e-6, atol=1e-6)


def test_a_head_site_is_the_output_projections_input_split_by_head(twin):
    """"heads.<l>" reads (batch, seq, heads, head_dim): what the attention's output projection receives, one head
    per slice; replacing one head's output from another run changes that head only."""
    clean, other = two_inputs(twin)
    layer = 0
    projection = site_module(twin, heads_site(layer))
    seen = {}
    handle = projection.register_forward_pre_hook(lambda _m, args: seen.__setitem__("input", args[0].detach()))
    try:
        with intervene(twin, [Read(heads_site(layer))]) as read:
            twin.last_logits(clean)
    finally:
        handle.remove()
    heads = read[heads_site(layer)]
    attention = twin.attention_modules[layer]
    assert heads.shape[-1] == attention.head_dim and heads.shape[-2] * attention.head_dim == seen["input"].shape[-1]
    torch.testing.assert_close(heads.flatten(-2), seen["input"], rtol=0, atol=0)
    with intervene(twin, [Read(heads_site(layer))]) as other_read:
        twin.last_logits(other)
    last = clean["input_ids"].shape[1] - 1

    def patch_head(tensor, h=1):
        tensor = tensor.clone()
        tensor[:, last, h] = other_read[heads_site(layer)][:, last, h]
        return tensor

    with intervene(twin, [Apply(heads_site(layer), patch_head), Read(heads_site(layer))]) as patched:
        twin.last_logits(clean)
    changed = (patched[heads_site(layer)] - heads).abs().amax(-1)[0]       # (seq, heads)
    assert float(changed[last, 1]) > 0
    changed[last, 1] = 0
    assert float(changed.max()) == 0.0


def test_bad_sites_are_refused_and_nothing_stays_installed(twin):
    clean, _ = two_inputs(twin)
    for site, message in (("layers.0", "unknown site"), (layer_site(twin.n_layers), "out of range"),
                          ("scores.x", "unknown site")):
        with pytest.raises(SiteError, match=message), intervene(twin, [Read(site)]):
            pass
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in twin.model.modules())
    with pytest.raises(SiteError), intervene(twin, [Read(VISUAL), Read(layer_site(0)), Read("scores.0")]):
        pass
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in twin.model.modules()) == hooks


def test_the_worked_example_in_the_docs_runs_and_means_what_it_says(twin):
    """docs/experiments.md's worked example (patching one head), executed as written: one probability per pair,
    layer and head; and the site it edits takes a counterfactual's last-position heads exactly (Replace there)."""
    text = (REPO / "docs" / "experiments.md").read_text()
    code = text.split("### Worked example")[1].split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "docs/experiments.md", "exec"), namespace)
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    out = namespace["head_patching"](twin, setting, n_pairs=1, layers=[0, twin.n_layers - 1])
    heads = twin.attention_modules[0].config.num_attention_heads
    assert out.shape == (1, 2, heads) and bool(((out >= 0) & (out <= 1)).all())
    pair = namespace["last_token_pairs"](setting, twin.grid, twin.layout, 1, 0)[0]
    clean = twin.encode([pair.clean.image], [pair.clean.prompt])
    counterfactual = twin.encode([pair.counterfactual.image], [pair.counterfactual.prompt])
    site = heads_site(twin.n_layers - 1)
    with intervene(twin, [Read(site)]) as source:
        twin.last_logits(counterfactual)
    last = clean["input_ids"].shape[1] - 1
    every_head = Replace(site, [last], source[site], [counterfactual["input_ids"].shape[1] - 1])
    with intervene(twin, [every_head, Read(site)]) as patched:
        twin.last_logits(clean)
    torch.testing.assert_close(patched[site][:, last], source[site][:, -1], rtol=0, atol=0)
