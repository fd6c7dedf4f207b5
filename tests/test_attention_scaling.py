"""ScalingVis / AdaptVis on both twins (steering/scalingvis.py, through the score sites of vlm/interventions.py):
the authors' operation against an attention forward written out by hand, identity at c = 1, only the last row's
image-key scores changed, sdpa = eager, the vision tower untouched, the attention implementation restored;
the last position replayed from a recorded plain forward equal to the full forward; AdaptVis's rounded
confidence and choice; and the post-softmax reweighting that is kept under its own name
(steering/reweighting.py)."""

import math

import numpy as np
import pytest
import torch
from transformers import AttentionInterface

from common.errors import UsageError
from data_gen.render import random_samples
from data_gen.settings import Setting
from steering.reweighting import reweighted_logits, reweighting_rows
from steering.scalingvis import (
    adaptvis_coefficients,
    adaptvis_confidence,
    adaptvis_rows,
    choose_coefficients,
    scaled_logits,
    scalingvis_edits,
    scalingvis_rows,
)
from tests.helpers import TWINS, load_twin, make_cfg
from vlm.interventions import ATTENTION_PREFIX, VISUAL, Read, ScaleScores, attention_rows, intervene
from vlm.models import load_model
from vlm.replay import record, replayed_runs
from vlm.scoring import AnswerScorer, candidate_probabilities, replayed_probabilities

_eager, _prepared = {}, {}


def eager_twin(name: str):
    """The twin with eager attention, whose self-attention returns its weights."""
    if name not in _eager:
        _eager[name] = load_model(make_cfg(f"model={name}", "model.attn_implementation=eager"))
    return _eager[name]


def sdpa_twin(name: str):
    return load_twin(name)


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


# --- the reference: every LM attention forward written out by hand ------------------------------------------

def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hand_written_attention(module, hidden, cos, sin, mask, image_keys, coefficients):
    """One decoder layer's self-attention as eager attention computes it, with the last query row's scores
    at image keys (after the scale, before the additive `mask`) times the example's coefficient."""
    batch, seq, _ = hidden.shape
    dim = module.head_dim
    q = module.q_proj(hidden).view(batch, seq, -1, dim).transpose(1, 2)
    k = module.k_proj(hidden).view(batch, seq, -1, dim).transpose(1, 2)
    v = module.v_proj(hidden).view(batch, seq, -1, dim).transpose(1, 2)
    if hasattr(module, "q_norm"):                                      # Gemma 3: RMS norm on q and k first
        q, k = module.q_norm(q), module.k_norm(k)
    cos, sin = cos[:, None], sin[:, None]                              # Qwen2-VL's cos/sin carry M-RoPE
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    config = module.config
    scale = config.query_pre_attn_scalar ** -0.5 if hasattr(config, "query_pre_attn_scalar") else dim ** -0.5
    scores = q @ k.transpose(-1, -2) * scale                           # (batch, heads, seq, seq)
    last = scores[:, :, -1, :]
    factor = torch.as_tensor(coefficients, dtype=scores.dtype).expand(batch)[:, None, None]
    scores = torch.cat([scores[:, :, :-1], torch.where(image_keys[:, None, :], last * factor, last)[:, :, None]], 2)
    weights = torch.softmax((scores + mask).float(), dim=-1).to(q.dtype)
    out = (weights @ v).transpose(1, 2).reshape(batch, seq, -1)
    return module.o_proj(out), weights


@torch.no_grad()
def reference_logits(vlm, coefficients):
    """Last logits of the eager twin with every LM self-attention's output replaced by `hand_written_attention`
    (forward hooks), and {layer: weights} it computed."""
    inputs, visual, _ = prepared(vlm)
    image_keys = inputs["input_ids"] == vlm.image_token_id
    weights, handles = {}, []
    for layer, block in enumerate(vlm.decoder_layers):
        def replace(module, args, kwargs, output, layer=layer):
            cos, sin = kwargs["position_embeddings"]
            mask = kwargs["attention_mask"]
            assert mask.dtype != torch.bool and mask.shape[-1] == mask.shape[-2]    # eager: additive, full
            out, weights[layer] = hand_written_attention(module, kwargs["hidden_states"], cos, sin, mask,
                                                         image_keys, coefficients)
            return out, weights[layer]
        handles.append(block.self_attn.register_forward_hook(replace, with_kwargs=True))
    try:
        return vlm.last_logits(inputs, visual), weights
    finally:
        for handle in handles:
            handle.remove()


def attention_weights(vlm, coefficients=None):
    """{layer: (batch, heads, queries, keys)} attention weights of one eager forward, ScalingVis when given."""
    inputs, visual, _ = prepared(vlm)
    weights, handles = {}, []
    for layer, block in enumerate(vlm.decoder_layers):
        def record(_module, _args, output, layer=layer):
            weights[layer] = output[1].detach()
        handles.append(block.self_attn.register_forward_hook(record))
    try:
        logits = (vlm.last_logits(inputs, visual) if coefficients is None
                  else scaled_logits(vlm, inputs, coefficients, visual_tokens=visual))
    finally:
        for handle in handles:
            handle.remove()
    return logits, weights


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("coefficients", [0.0, 0.5, 2.0, (0.8, 1.5)])
def test_scalingvis_equals_a_hand_written_attention_forward(name, coefficients):
    vlm = eager_twin(name)
    expected, expected_weights = reference_logits(vlm, coefficients)
    logits, weights = attention_weights(vlm, list(coefficients) if isinstance(coefficients, tuple) else coefficients)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    for layer in range(vlm.n_layers):
        torch.testing.assert_close(weights[layer], expected_weights[layer], rtol=0, atol=1e-5)
    assert float((logits - prepared(vlm)[2]).abs().max()) > 1e-4      # and it did change the answer's logits


@pytest.mark.parametrize("name", TWINS)
def test_hand_written_reference_at_one_is_the_plain_forward(name):
    vlm = eager_twin(name)
    torch.testing.assert_close(reference_logits(vlm, 1.0)[0], prepared(vlm)[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("coefficient", [0.0, 3.0])
def test_only_the_last_rows_image_key_scores_change(name, coefficient):
    vlm = eager_twin(name)
    inputs = prepared(vlm)[0]
    image = (inputs["input_ids"] == vlm.image_token_id)[:, None, :]           # (batch, 1, keys)
    _, plain = attention_weights(vlm)
    _, scaled = attention_weights(vlm, coefficient)
    for layer in range(vlm.n_layers):
        # every row but the last is the model's own, bit for bit (the last position changes no earlier one)
        torch.testing.assert_close(scaled[layer][:, :, :-1], plain[layer][:, :, :-1], rtol=0, atol=0)
    # layer 0 sees the same inputs: last-row weights are softmax(s') with s' = s off the image, c s on it
    before, after = plain[0][:, :, -1].double(), scaled[0][:, :, -1].double()   # (batch, heads, keys)
    seen = before > 0
    log_before, log_after = before.log(), after.log()
    # text keys keep their scores: log-weight differences between text keys are unchanged
    text = seen & ~image
    anchor = text.double().argmax(-1, keepdim=True)                            # one visible text key per row
    shift_before = log_before - log_before.gather(-1, anchor)
    shift_after = log_after - log_after.gather(-1, anchor)
    torch.testing.assert_close(shift_after[text], shift_before[text], rtol=0, atol=1e-5)
    on_image = seen & image
    assert int(on_image.sum()) > 0
    rows = on_image.any(-1)

    def spread(values):                         # max - min over the visible image keys of each row
        top = torch.where(on_image, values, -torch.inf).amax(-1)
        return (top - torch.where(on_image, values, torch.inf).amin(-1))[rows]

    if coefficient == 0:
        # image scores are 0: every visible image key of a row has the same weight
        assert float(spread(log_after).max()) < 1e-5 and float(spread(log_before).max()) > 1e-3
    else:
        # s_img - s_anchor = shift_before and c s_img - s_anchor = shift_after give one s_anchor per row
        assert float(spread((coefficient * shift_before - shift_after) / (1 - coefficient)).max()) < 1e-4
    torch.testing.assert_close(after.sum(-1), torch.ones_like(after.sum(-1)), rtol=0, atol=1e-6)


def test_coefficient_one_is_the_plain_forward_bit_for_bit(twin):
    inputs, visual, plain = prepared(twin)
    for ones in (1.0, [1.0, 1.0]):
        torch.testing.assert_close(scaled_logits(twin, inputs, ones, visual_tokens=visual), plain, rtol=0, atol=0)
    # an example with c = 1 in a batch that is scaled keeps the model's own computation, bit for bit
    mixed = scaled_logits(twin, inputs, [1.0, 2.0], visual_tokens=visual)
    torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=0)
    # just above 1 the function runs: the last row is recomputed explicitly
    torch.testing.assert_close(scaled_logits(twin, inputs, 1 + 1e-6, visual_tokens=visual), plain, rtol=0, atol=1e-5)


def test_per_example_coefficients_equal_separate_runs(twin):
    inputs, visual, plain = prepared(twin)
    doubled = scaled_logits(twin, inputs, 2.0, visual_tokens=visual)
    zero = scaled_logits(twin, inputs, 0.0, visual_tokens=visual)
    assert float((doubled - plain).abs().max()) > 1e-3
    mixed = scaled_logits(twin, inputs, torch.tensor([0.0, 2.0]), visual_tokens=visual)
    torch.testing.assert_close(mixed[0], zero[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], doubled[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", TWINS)
def test_sdpa_and_eager_agree(name):
    sdpa, eager = sdpa_twin(name), eager_twin(name)
    inputs, visual, plain = prepared(sdpa)
    torch.testing.assert_close(prepared(eager)[2], plain, rtol=0, atol=1e-5)
    for coefficients in (0.0, 0.5, 2.0, [0.8, 1.5]):
        torch.testing.assert_close(scaled_logits(sdpa, inputs, coefficients, visual_tokens=visual),
                                   scaled_logits(eager, inputs, coefficients, visual_tokens=visual), rtol=0, atol=1e-5)


def test_layers_subset_scales_only_those_layers():
    vlm = eager_twin("tiny_qwen2vl")
    inputs, visual, plain = prepared(vlm)
    weights, handles = {}, []
    for layer, block in enumerate(vlm.decoder_layers):
        handles.append(block.self_attn.register_forward_hook(
            lambda _m, _a, output, layer=layer: weights.__setitem__(layer, output[1])))
    try:
        scaled_logits(vlm, inputs, 2.0, layers=[1], visual_tokens=visual)
    finally:
        for handle in handles:
            handle.remove()
    _, plain_weights = attention_weights(vlm)
    torch.testing.assert_close(weights[0], plain_weights[0], rtol=0, atol=0)         # before layer 1: untouched
    assert float((weights[1][:, :, -1] - plain_weights[1][:, :, -1]).abs().max()) > 1e-4


def test_gemma_sliding_window_and_own_scale():
    """A Gemma 3 twin whose layers alternate sliding (window 40, shorter than the text after the image's first
    tokens) and full attention, with query_pre_attn_scalar (24) != head_dim (16): the last row of a sliding
    layer cannot see the early image keys, with or without scaling, and the result still equals the
    hand-written forward, which scales by query_pre_attn_scalar ** -0.5."""
    vlm = load_model(make_cfg("model=tiny_gemma3", "model.init=random", "model.attn_implementation=eager",
                              "model.architecture.text_config.sliding_window=40",
                              "model.architecture.text_config.query_pre_attn_scalar=24",
                              "+model.architecture.text_config.layer_types=[sliding_attention,full_attention,"
                              "sliding_attention,full_attention]"))
    assert vlm.model.config.text_config.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert vlm.decoder_layers[0].self_attn.scaling == 24 ** -0.5 != vlm.decoder_layers[0].self_attn.head_dim ** -0.5
    expected, expected_weights = reference_logits(vlm, (0.0, 2.0))     # c = 0: masked image keys stay masked
    logits, weights = attention_weights(vlm, [0.0, 2.0])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    image = prepared(vlm)[0]["input_ids"] == vlm.image_token_id
    first_image = image.double().argmax(-1)
    for layer in (0, 2):                                                         # sliding layers
        torch.testing.assert_close(weights[layer], expected_weights[layer], rtol=0, atol=1e-5)
        last = weights[layer][:, :, -1]
        for row in range(last.shape[0]):
            assert float(last[row, :, first_image[row]].abs().max()) == 0.0          # outside the window
    assert float(weights[1][:, :, -1][image[:, None, :].expand_as(weights[1][:, :, -1])].min()) > 0   # full layer


def test_softcap_comes_before_the_coefficient():
    """Were a softcap passed (transformers 5.24's Gemma 3 passes none), c multiplies the capped score."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 5, 8) * 3, torch.randn(2, 2, 5, 8) * 3, torch.randn(2, 2, 5, 8)
    image = torch.tensor([[False, True, True, False, False], [False, False, True, True, False]])
    coefficients = torch.tensor([0.0, 2.0])
    edit = ScaleScores("scores.0", coefficients, image, "last")
    out, weights = attention_rows(query, key, value, None, 0.5, [edit], groups=2, softcap=4.0, rows=slice(-1, None))
    k, v = key.repeat_interleave(2, 1), value.repeat_interleave(2, 1)
    scores = 4.0 * torch.tanh(query[:, :, -1:] @ k.transpose(2, 3) * 0.5 / 4.0)
    scores = torch.where(image[:, None, None], scores * coefficients[:, None, None, None], scores)
    expected = torch.softmax(scores, -1)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, (expected @ v).transpose(1, 2), rtol=0, atol=1e-6)
    assert bool((weights[0, :, 0, 1] == weights[0, :, 0, 2]).all())               # c = 0: equal image weights


def test_vision_tower_is_untouched(twin):
    inputs, visual, _ = prepared(twin)
    vision = twin.adapter.module(twin.model, "vision_layers")
    seen, handles = set(), []
    for module in vision.modules():
        if hasattr(module, "config"):
            handles.append(module.register_forward_pre_hook(
                lambda m, _args: seen.add(m.config._attn_implementation)))
    try:
        with intervene(twin, [Read(VISUAL)]) as scaled:
            scaled_logits(twin, inputs, 2.0)                  # a full forward, vision tower included
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"sdpa"}
    torch.testing.assert_close(scaled[VISUAL], visual, rtol=0, atol=0)


def attention_pre_hooks(vlm) -> int:
    return sum(len(m._forward_pre_hooks) for m in vlm.attention_modules)


def test_attention_implementation_is_restored_even_on_error(twin):
    inputs, visual, plain = prepared(twin)
    text, vision = twin.model.config.text_config, twin.model.config.vision_config
    edits = scalingvis_edits(twin, inputs["input_ids"], 2.0)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(twin, edits):
            assert text._attn_implementation == ATTENTION_PREFIX + "sdpa" and vision._attn_implementation == "sdpa"
            assert ATTENTION_PREFIX + "sdpa" in AttentionInterface()       # registered on first use
            assert twin.model.config._attn_implementation == "sdpa"
            assert attention_pre_hooks(twin) == twin.n_layers
            raise RuntimeError("boom")
    assert text._attn_implementation == "sdpa" and vision._attn_implementation == "sdpa"
    assert attention_pre_hooks(twin) == 0
    torch.testing.assert_close(twin.last_logits(inputs, visual), plain, rtol=0, atol=0)


def test_bad_arguments_are_refused(twin):
    inputs = prepared(twin)[0]
    for coefficient in (-0.5, float("inf"), float("nan")):
        with pytest.raises(UsageError, match=">= 0"):
            scaled_logits(twin, inputs, coefficient)
    with pytest.raises(UsageError, match="out of range"):
        scaled_logits(twin, inputs, 2.0, layers=[twin.n_layers])
    with pytest.raises(ValueError, match="3 coefficients for a batch of 2"):
        scaled_logits(twin, inputs, [1.0, 2.0, 3.0])
    edits = scalingvis_edits(twin, inputs["input_ids"], 2.0)
    with pytest.raises(RuntimeError, match="already being edited"):
        with intervene(twin, edits), intervene(twin, edits):
            pass
    assert attention_pre_hooks(twin) == 0 and twin.model.config.text_config._attn_implementation == "sdpa"


# --- the last position replayed from a recorded plain forward ------------------------------------------------

REPLAY_MODELS = ["tiny_qwen2vl", "tiny_gemma3", "dual_organism"]


def recorded(vlm):
    """(batch-1 inputs, their visual tokens, their records) of three squares images whose prompts differ in
    length, so one replay pass pads the shorter records' keys."""
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    samples = random_samples(setting, vlm.grid, vlm.layout, 3, seed=5)
    prompts = [samples[0].prompt, samples[1].prompt + " square", samples[2].prompt]
    inputs = [vlm.encode([s.image], [p]) for s, p in zip(samples, prompts, strict=True)]
    visual = [vlm.visual_tokens(i) for i in inputs]
    return inputs, visual, record(vlm, inputs, visual, batch_size=4)


@pytest.mark.parametrize("name", REPLAY_MODELS)
def test_replayed_last_row_equals_the_full_forward(name):
    """ScalingVis (every grid coefficient, and per-sample AdaptVis coefficients) and the last-row reweighting
    replayed over the last position of each recorded plain forward give the full forward's logits to 1e-5."""
    vlm = load_twin(name)
    inputs, visual, records = recorded(vlm)
    assert len({rec.length for rec in records}) > 1
    plain = torch.cat([vlm.last_logits(i, v) for i, v in zip(inputs, visual, strict=True)])
    moved = 0.0
    for coefficients in (0.0, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, [0.5, 1.5, 2.0]):
        per = torch.as_tensor(coefficients, dtype=torch.float32).expand(3)
        replayed = replayed_runs(vlm, scalingvis_rows(vlm, records, coefficients), False).logits
        full = torch.cat([scaled_logits(vlm, inputs[k], float(per[k]), visual_tokens=visual[k]) for k in range(3)])
        torch.testing.assert_close(replayed, full, rtol=0, atol=1e-5, msg=lambda m, c=coefficients: f"c={c}: {m}")
        moved = max(moved, float((full - plain).abs().max()))
    for coefficient in (0.5, 2.0):
        replayed = replayed_runs(vlm, reweighting_rows(vlm, records, coefficient), False).logits
        full = torch.cat([reweighted_logits(vlm, inputs[k], coefficient, visual_tokens=visual[k]) for k in range(3)])
        torch.testing.assert_close(replayed, full, rtol=0, atol=1e-5)
    assert moved > 1e-3                                     # the coefficients change the logits


def test_replayed_whole_answers_equal_the_full_forward(twin):
    """Whole-answer scoring continues each replayed row from its own keys and values: equal to the full forward
    under the same coefficient."""
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    scorer = AnswerScorer(twin.tokenizer, [*setting.candidates, "water bottle", "water"])
    assert not scorer.exact
    inputs, visual, records = recorded(twin)
    coefficients = [0.5, 1.5, 2.0]
    replayed = replayed_probabilities(twin, scorer, scalingvis_rows(twin, records, coefficients), batch_size=2)
    full = torch.cat([candidate_probabilities(twin, scorer, inputs[k], visual[k],
                                              scalingvis_edits(twin, inputs[k]["input_ids"], coefficients[k]))[0]
                      for k in range(3)])
    torch.testing.assert_close(replayed, full, rtol=0, atol=1e-6)
    assert bool((full[:, -1] > 0).all())


# --- AdaptVis -----------------------------------------------------------------------------------------------

def _logits_with_top_probability(p: float, vocab: int = 10) -> torch.Tensor:
    """One row of logits whose softmax has largest probability p (the rest spread evenly)."""
    row = torch.zeros(vocab, dtype=torch.float64)
    row[0] = math.log(p * (vocab - 1) / (1 - p))
    return row.float()


def test_adaptvis_rounds_the_vocabulary_confidence_and_picks_the_weight():
    logits = torch.stack([_logits_with_top_probability(p) for p in (0.3949, 0.3951, 0.4049, 0.81)])
    confidence = adaptvis_confidence(logits)
    assert confidence.tolist() == [0.39, 0.40, 0.40, 0.81]
    # threshold 0.4: 0.3951 rounds to 0.40, which is not < 0.4 (the authors' `uncertainty < threshold`)
    assert choose_coefficients(confidence, 0.4, 0.5, 1.5).tolist() == [0.5, 1.5, 1.5, 1.5]
    assert choose_coefficients(confidence, 0.81, 0.8, 2.0).tolist() == [pytest.approx(0.8)] * 3 + [2.0]
    # the whole vocabulary counts, not a candidate set
    wide = torch.zeros(1, 100)
    assert adaptvis_confidence(wide).tolist() == [0.01]
    # as numpy rounds a Python float of the float32 softmax maximum
    rng = np.random.default_rng(0)
    random = torch.from_numpy(rng.normal(size=(200, 50)).astype(np.float32) * 3)
    top = torch.softmax(random, -1).max(-1).values
    assert adaptvis_confidence(random).tolist() == [np.round(float(v), 2) for v in top]
    with pytest.raises(UsageError, match="weight1"):
        choose_coefficients(confidence, 0.4, -1.0, 1.2)


def test_adaptvis_end_to_end_on_a_twin(twin):
    inputs, visual, plain = prepared(twin)
    confidence = adaptvis_confidence(plain)
    threshold = float(confidence.max())                             # the most confident example gets weight2
    coefficients = adaptvis_coefficients(twin, inputs, threshold, 0.5, 1.2, logits=plain)
    expected = [1.2 if c >= threshold else 0.5 for c in confidence.tolist()]
    assert coefficients.tolist() == pytest.approx(expected)
    torch.testing.assert_close(adaptvis_coefficients(twin, inputs, threshold, 0.5, 1.2), coefficients)
    adapted = scaled_logits(twin, inputs, coefficients, visual_tokens=visual)
    for row, coefficient in enumerate(coefficients.tolist()):
        alone = scaled_logits(twin, inputs, coefficient, visual_tokens=visual)
        torch.testing.assert_close(adapted[row], alone[row], rtol=0, atol=1e-6)
    # steering.run's shortcut: each example's row from the ScalingVis run at its own coefficient
    selected = adaptvis_rows(confidence, threshold, scaled_logits(twin, inputs, 0.5, visual_tokens=visual),
                               scaled_logits(twin, inputs, 1.2, visual_tokens=visual))
    torch.testing.assert_close(selected, adapted, rtol=0, atol=1e-6)


# --- not ScalingVis: post-softmax reweighting, kept under its own name ----------------------------------------

@pytest.mark.parametrize("queries", ["last", "all"])
def test_reweighting_rescales_post_softmax_image_weights_and_renormalises(queries):
    vlm = eager_twin("tiny_gemma3")
    inputs, visual, plain = prepared(vlm)
    coefficient = 3.0
    weights, handles = {}, []
    handles.append(vlm.decoder_layers[0].self_attn.register_forward_hook(
        lambda _m, _a, output: weights.__setitem__("scaled", output[1])))
    try:
        reweighted_logits(vlm, inputs, coefficient, queries=queries, visual_tokens=visual)
    finally:
        handles[0].remove()
    _, plain_weights = attention_weights(vlm)
    before, after = plain_weights[0].double(), weights["scaled"].double()
    image = (inputs["input_ids"] == vlm.image_token_id)[:, None, None, :]
    real = inputs["attention_mask"].bool()
    selected = torch.zeros(before.shape[2], dtype=torch.bool)
    selected[-1 if queries == "last" else 0:] = True
    torch.testing.assert_close(after[:, :, ~selected], before[:, :, ~selected], rtol=0, atol=0)
    rows = selected[None, None, :, None] & real[:, None, :, None]
    attended = (before > 0) & real[:, None, None, :]
    ratio = torch.where(attended, after / before, torch.nan)
    text_ratio = torch.where(attended & ~image, ratio, torch.nan).nanmean(-1, keepdim=True)
    expected = torch.where(image, coefficient * text_ratio, text_ratio)
    check = attended & rows
    torch.testing.assert_close(ratio[check], expected[check], rtol=1e-4, atol=0)
    with pytest.raises(UsageError, match="positive"):
        reweighted_logits(vlm, inputs, 0.0)
    torch.testing.assert_close(reweighted_logits(vlm, inputs, 1.0, visual_tokens=visual), plain, rtol=0, atol=0)
