"""ScalingVis / AdaptVis attention scaling on both twins: identity at 1, rows renormalised, only image-key
columns rescaled, hooks always removed, AdaptVis's choice of coefficient."""

import pytest
import torch

from common.errors import UsageError
from data_gen.render import random_samples
from data_gen.settings import Setting
from steering.attention import (
    adaptvis_coefficients,
    choose_coefficients,
    confidence,
    scale_image_attention,
    scaled_logits,
)
from tests.conftest import TWINS, make_cfg
from vlm.hooks import capture
from vlm.models import load_model
from vlm.scoring import AnswerScorer

_eager, _prepared = {}, {}


def eager_twin(name: str):
    """The twin with eager attention, whose self-attention returns its weights."""
    if name not in _eager:
        _eager[name] = load_model(make_cfg(f"model={name}", "model.attn_implementation=eager"))
    return _eager[name]


def prepared(vlm):
    """(inputs, visual tokens, plain last logits) of two squares images whose prompts differ in length, so
    the batch is left-padded. The visual tokens are computed once: later forwards run the LM only."""
    key = (vlm.name, id(vlm))
    if key not in _prepared:
        setting = Setting.from_config(make_cfg("setting=squares").setting)
        samples = random_samples(setting, vlm.grid, vlm.layout, 2, seed=3)
        inputs = vlm.encode([s.image for s in samples], [samples[0].prompt, samples[1].prompt + " square"])
        visual = vlm.visual_tokens(inputs)
        _prepared[key] = inputs, visual, vlm.last_logits(inputs, visual)
    return _prepared[key]


def attention_weights(vlm, layers, **scaling):
    """{layer: (batch, heads, queries, keys)} attention weights of one forward, scaled when `scaling` is given."""
    inputs, visual, _ = prepared(vlm)
    weights, handles = {}, []
    for layer in layers:
        def record(_module, _args, output, layer=layer):
            weights[layer] = output[1].detach()
        handles.append(vlm.decoder_layers[layer].self_attn.register_forward_hook(record))
    try:
        if scaling:
            scaled_logits(vlm, inputs, visual_tokens=visual, **scaling)
        else:
            vlm.last_logits(inputs, visual)
    finally:
        for handle in handles:
            handle.remove()
    return weights


def test_coefficient_one_is_the_identity_and_the_rebuilt_mask_is_the_models_own(twin):
    inputs, visual, plain = prepared(twin)
    for ones in (1.0, [1.0, 1.0]):
        torch.testing.assert_close(scaled_logits(twin, inputs, ones, visual_tokens=visual), plain, rtol=0, atol=0)
    # just above 1 the hooks run: the sdpa mask (boolean, or None for the causal shortcut) is rebuilt additive
    near_one = scaled_logits(twin, inputs, 1 + 1e-6, visual_tokens=visual)
    torch.testing.assert_close(near_one, plain, rtol=0, atol=1e-5)


def test_coefficient_two_changes_logits_per_example(twin):
    inputs, visual, plain = prepared(twin)
    doubled = scaled_logits(twin, inputs, 2.0, visual_tokens=visual)
    assert float((doubled - plain).abs().max()) > 1e-3
    mixed = scaled_logits(twin, inputs, torch.tensor([1.0, 2.0]), visual_tokens=visual)
    torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], doubled[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("queries", ["last", "all"])
def test_only_image_key_columns_are_rescaled_and_rows_sum_to_one(name, queries):
    vlm = eager_twin(name)
    inputs = prepared(vlm)[0]
    coefficient = 3.0
    layers = [0, vlm.n_layers - 1]
    plain = attention_weights(vlm, layers)
    scaled = attention_weights(vlm, layers, coefficients=coefficient, queries=queries)
    for layer in layers:
        torch.testing.assert_close(scaled[layer].sum(-1), torch.ones_like(scaled[layer].sum(-1)), rtol=0, atol=1e-5)

    # layer 0 sees the same inputs in both runs: compare its weights row by row
    before, after = plain[0].double(), scaled[0].double()                            # (batch, heads, q, k)
    image = (inputs["input_ids"] == vlm.image_token_id)[:, None, None, :]
    real = inputs["attention_mask"].bool()                                            # not left padding
    selected = torch.zeros(before.shape[2], dtype=torch.bool)
    selected[-1 if queries == "last" else 0:] = True
    torch.testing.assert_close(after[:, :, ~selected], before[:, :, ~selected], rtol=0, atol=0)
    rows = selected[None, None, :, None] & real[:, None, :, None]
    attended = (before > 0) & real[:, None, None, :]
    ratio = torch.where(attended, after / before, torch.nan)
    # within a row every text key keeps one ratio r (the renormalisation), every image key gets coefficient * r
    text_ratio = torch.where(attended & ~image, ratio, torch.nan).nanmean(-1, keepdim=True)
    expected = torch.where(image, coefficient * text_ratio, text_ratio)
    check = attended & rows
    assert int(check.sum()) > 0
    torch.testing.assert_close(ratio[check], expected[check], rtol=1e-4, atol=0)
    sees_image = (attended & image).any(-1, keepdim=True) & rows                     # rows before the image do not
    assert bool(sees_image.any()) and bool((text_ratio[sees_image] < 1).all())        # the image share grew


def test_vision_tower_is_untouched(twin):
    inputs, visual, _ = prepared(twin)
    with capture({"visual": twin.visual_embedding_module}) as scaled:
        scaled_logits(twin, inputs, 2.0)                  # a full forward, vision tower included
    torch.testing.assert_close(twin.adapter.visual_tokens(scaled["visual"], twin.n_visual_tokens), visual,
                               rtol=0, atol=0)


def test_hooks_are_removed_after_the_block_even_on_error(twin):
    inputs, visual, plain = prepared(twin)
    with pytest.raises(RuntimeError, match="boom"):
        with scale_image_attention(twin, inputs, 2.0):
            assert all(len(layer.self_attn._forward_pre_hooks) == 1 for layer in twin.decoder_layers)
            raise RuntimeError("boom")
    assert all(len(layer.self_attn._forward_pre_hooks) == 0 for layer in twin.decoder_layers)
    torch.testing.assert_close(twin.last_logits(inputs, visual), plain, rtol=0, atol=0)


def test_bad_arguments_are_refused(twin):
    inputs = prepared(twin)[0]
    for coefficient in (0.0, -1.0, float("inf")):
        with pytest.raises(UsageError, match="positive"):
            scaled_logits(twin, inputs, coefficient)
    with pytest.raises(UsageError, match="queries"):
        scaled_logits(twin, inputs, 2.0, queries="middle")
    with pytest.raises(UsageError, match="out of range"):
        scaled_logits(twin, inputs, 2.0, layers=[twin.n_layers])
    with pytest.raises(ValueError, match="3 coefficients for a batch of 2"):
        scaled_logits(twin, inputs, [1.0, 2.0, 3.0])


def test_adaptvis_smooths_when_unsure_and_sharpens_when_sure():
    confidences = torch.tensor([0.1, 0.39, 0.4, 0.95])
    assert choose_coefficients(confidences, 0.4, 0.5, 1.5).tolist() == [0.5, 0.5, 1.5, 1.5]
    logits = torch.full((2, 10), -20.0)
    logits[0, 3] = 20.0          # sure: almost all probability on one token
    logits[1, :4] = 1.0          # unsure: spread over four tokens
    torch.testing.assert_close(confidence(logits), torch.tensor([1.0, 0.25]), rtol=0, atol=1e-6)
    assert choose_coefficients(confidence(logits), 0.3, 0.8, 2.0).tolist() == [2.0, pytest.approx(0.8)]
    with pytest.raises(UsageError, match="weight1"):
        choose_coefficients(confidences, 0.4, 0.0, 1.2)


def test_adaptvis_end_to_end_on_a_twin(twin):
    inputs, visual, plain = prepared(twin)
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    scorer = AnswerScorer(twin.tokenizer, setting.candidates)
    threshold = float(confidence(plain, scorer).mean())            # one example below, one above
    coefficients = adaptvis_coefficients(twin, inputs, threshold, 0.5, 1.2, scorer=scorer, logits=plain)
    assert sorted(coefficients.tolist()) == [0.5, pytest.approx(1.2)]
    adapted = scaled_logits(twin, inputs, coefficients, visual_tokens=visual)
    for row, coefficient in enumerate(coefficients.tolist()):
        alone = scaled_logits(twin, inputs, coefficient, visual_tokens=visual)
        torch.testing.assert_close(adapted[row], alone[row], rtol=0, atol=1e-5)
