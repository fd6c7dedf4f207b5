"""ScalingVis and AdaptVis (Chen et al. 2025, "Why Is Spatial Reasoning Hard for VLMs? An Attention Mechanism
Perspective on Focus Areas", arXiv 2503.01773), exactly as the authors' code does them, on Qwen2-VL and Gemma 3
through transformers' attention interface; plus, under its own name, an image-attention reweighting that is
not theirs.

The authors' code (github.com/shiqichen17/AdaptVis, LLaVA-1.5; read at commit 3b41399):

- `model_zoo/llama/modeling_llama_add_attn.py`, `LLaMAAttention.forward`: `attn_weights = q @ k^T /
  sqrt(head_dim)`; then, in every decoder layer (`if idx<32`, all 32 of LLaMA-7B) and only when the score
  matrix is square (the one full forward over the prompt; cached decoding steps are left alone), `mask[-1,
  start_idx:start_idx + square_size] = True; attn_weights[:, :, mask] *= weight`: the last query row's scores
  at the image-token keys, every head, times `weight`; then `+ attention_mask`, then the softmax (in float32).
  The image span comes from `model_zoo/llava/modeling_llava_scal.py` (the merged image features' positions).
- `model_zoo/llava15.py`, `get_out_scores_wh_batched` (What'sUp): `scaling_vis` generates with `weight`;
  `adapt_vis` generates once with weight 1, takes `uncertainty = np.round(float(max(softmax(output['scores']
  [0], dim=-1)[0])), 2)` (the largest probability over the whole vocabulary of the first generated token,
  rounded to two decimals) and generates again with `weight1` if `uncertainty < threshold` else `weight2`.
- README: `weight` in [0, 0.5, 0.8, 1.2, 1.5, 2.0], `weight1` in [0.5, 0.8], `weight2` in [1.2, 1.5, 2.0];
  `run.sh` (their What'sUp Controlled_Images_A run): `--weight1 0.5 --weight2 1.5 --threshold 0.4`
  (commented out: `--method=scaling_vis --weight=0.8`).

Here (`scale_image_attention`, `scaled_logits`): the coefficient c multiplies the pre-softmax scores (after the
model's own scaling, before the mask and the softmax) of the last query row at the image-token keys, in every
head of the chosen LM decoder layers (default: all), in a full forward over the prompt (query length = key
length; a cached decoding step is left alone, as theirs). c = 1 is the identity, c = 0 makes those scores 0
(not -inf), c > 1 sharpens and c < 1 flattens the last row's distribution over image keys; keys that the mask
hides stay hidden. Each example of a batch may have its own c (AdaptVis).

How, in transformers 5.24: every LM attention module calls `ALL_ATTENTION_FUNCTIONS.get_interface(
self.config._attn_implementation, eager_attention_forward)`, where `self.config` is the text config, one
object shared by the LM's layers and by nothing else (Qwen2-VL's vision tower, which uses the same interface,
and Gemma 3's SigLIP tower hold the vision config; checked on entry). Two attention functions are registered at
import, `image_scaling_sdpa` and `image_scaling_eager` (`AttentionInterface.register`, with the sdpa / eager
mask builders under the same names in `AttentionMaskInterface`, so the masks the LM builds are those of the
implementation it had). Within `scale_image_attention` the text config's `_attn_implementation` is switched
from sdpa (or eager) to the matching name and restored on exit, error or not. The function runs the model's own
attention (sdpa, or the model file's `eager_attention_forward`) unchanged, then, in the selected layers'
modules only, recomputes the last query row explicitly with the coefficient (`scaled_last_row`) and puts it in
place of that row (output and, for eager, weights) for the examples whose c != 1. Every other row, every
unselected layer and every example with c = 1 is the model's own computation, bit for bit.

Where transformers and the authors' LLaMA differ:
- the scale is the model's own (`scaling` as passed by the module): 1/sqrt(head_dim) for Qwen2-VL,
  `query_pre_attn_scalar ** -0.5` for Gemma 3; Qwen2-VL's M-RoPE and Gemma 3's q/k norms are already in the
  query and key the function receives;
- Gemma 3's sliding-window layers get their own (sliding) mask from the model; image keys outside the window
  are masked after the multiplication, as any masked key in the authors' code;
- soft-capping: transformers 5.24's `Gemma3Attention` does not pass `attn_logit_softcapping` to the attention
  function (the released Gemma 3 configs set it to None), so there is no cap to place. Were a `softcap` passed,
  the multiplication comes after it, on the capped score that enters the mask and the softmax, the place where
  the authors multiply (their LLaMA has no cap);
- the authors clamp `scores + mask` at the dtype's minimum before the softmax; with finite scores and
  transformers' finite masks this never changes a probability, so it is not repeated.

AdaptVis (`adaptvis_confidence`, `choose_coefficients`, `adaptvis_coefficients`, `adaptvis_rows`):
confidence = the largest softmax probability over the vocabulary at the answer position of the unmodified
run, rounded to two decimals as numpy rounds; c = weight1 if confidence < threshold else weight2.

`reweight_image_attention` / `reweighted_logits` keep this repository's earlier operation, which is NOT
ScalingVis: post-softmax image-key weights times c, each row renormalised (log c added to the additive mask).
"""

import functools
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from common.errors import UsageError, check_choice
from vlm.models import VLM

BASES = ("sdpa", "eager")                       # attention implementations the scaling wraps
PREFIX = "image_scaling_"                       # registered as image_scaling_sdpa, image_scaling_eager
QUERIES = ("last", "all")                       # reweighting only: rows reweighted


@dataclass
class _Scaling:
    """What the attention function does in one LM attention module during a `scale_image_attention` block."""

    coefficients: torch.Tensor      # (batch,) float32, on the model's device
    changed: torch.Tensor           # (batch,) bool: coefficient != 1 (the others keep the model's own row)
    image_keys: torch.Tensor        # (batch, seq) bool: image-token key columns


_ACTIVE: dict[torch.nn.Module, _Scaling] = {}   # selected LM attention modules -> their scaling, inside a block


def _model_eager(module):
    """The eager attention function of the module's own modeling file (Gemma 3's takes a softcap)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise UsageError(f"{type(module).__name__}'s modeling file has no eager_attention_forward")
    return function


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * groups, seq, dim), as transformers' repeat_kv."""
    if groups == 1:
        return states
    batch, heads, seq, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, seq, dim).reshape(batch, heads * groups, seq, dim)


def _last_row_mask(attention_mask, k_len: int, dtype) -> torch.Tensor | float:
    """The last query row of the mask the layer received, additive: None (sdpa's causal shortcut: the last
    row sees every key) -> 0; boolean (sdpa, True = attend) -> 0 / dtype min; float (eager) as it is."""
    if attention_mask is None:
        return 0.0
    row = attention_mask[..., -1:, :k_len]
    if row.dtype == torch.bool:
        return torch.where(row, torch.zeros((), dtype=dtype, device=row.device),
                           torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=row.device))
    return row


def scaled_last_row(query, key, value, attention_mask, scaling: float, coefficients: torch.Tensor,
                    image_keys: torch.Tensor, groups: int = 1, softcap: float | None = None, dropout: float = 0.0,
                    training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' operation on the last query row, written out as eager attention computes it.

    query (batch, heads, q, dim), key / value (batch, kv_heads, k, dim) after RoPE; attention_mask as the layer
    received it; coefficients (batch,); image_keys (batch, k) bool. scores = q_last k^T * scaling (then the
    softcap, if any); image-key scores times c (in float32, back to the dtype); + mask; softmax in float32.
    Returns the row's output (batch, 1, heads, dim) and weights (batch, heads, 1, k)."""
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query[:, :, -1:], key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    image = image_keys[:, None, None, :].to(scores.device)
    factor = coefficients.to(scores.device, torch.float32)[:, None, None, None]
    scores = torch.where(image, scores.float() * factor, scores.float()).to(scores.dtype)
    scores = scores + _last_row_mask(attention_mask, key.shape[2], scores.dtype)
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value).transpose(1, 2), weights


def _image_scaling_attention(base: str, module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """The registered attention function: the model's own `base` attention, then, in a module selected by an
    active `scale_image_attention` and in a full forward (query length = key length), the last row replaced by
    `scaled_last_row` for the examples whose coefficient is not 1."""
    function = sdpa_attention_forward if base == "sdpa" else _model_eager(module)
    output, weights = function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    spec = _ACTIVE.get(module)
    q_len, k_len = query.shape[2], key.shape[2]
    if spec is None or q_len != k_len:          # an unselected layer, or a cached decoding step
        return output, weights
    if spec.image_keys.shape != (query.shape[0], k_len):
        raise ValueError(f"image attention scaling was set up for inputs of shape {tuple(spec.image_keys.shape)}, "
                         f"the forward has batch {query.shape[0]} and {k_len} positions")
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    row, row_weights = scaled_last_row(query, key, value, attention_mask, scaling, spec.coefficients,
                                       spec.image_keys, module.num_key_value_groups, kwargs.get("softcap"),
                                       dropout, module.training)
    changed = spec.changed.to(output.device)
    output = torch.cat([output[:, :-1], torch.where(changed[:, None, None, None], row.to(output.dtype),
                                                     output[:, -1:])], dim=1)
    if weights is not None:
        weights = torch.cat([weights[:, :, :-1], torch.where(changed[:, None, None, None],
                                                             row_weights.to(weights.dtype), weights[:, :, -1:])], dim=2)
    return output, weights


for _base, _mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    AttentionInterface.register(PREFIX + _base, functools.partial(_image_scaling_attention, _base))
    AttentionMaskInterface.register(PREFIX + _base, _mask)


def _coefficients(coefficients, batch: int, positive: bool = False) -> torch.Tensor:
    """(batch,) float64 coefficients from a number or a sequence/tensor of `batch` numbers, all finite and
    >= 0 (> 0 with `positive`)."""
    values = torch.as_tensor(coefficients, dtype=torch.float64).flatten().cpu()
    if values.numel() == 1:
        values = values.expand(batch)
    if values.numel() != batch:
        raise ValueError(f"{values.numel()} coefficients for a batch of {batch}")
    low = values > 0 if positive else values >= 0
    if not bool(low.all()) or not bool(values.isfinite().all()):
        raise UsageError(f"attention coefficients must be {'positive' if positive else '>= 0'} and finite, "
                         f"got {values.tolist()}")
    return values


def _text_config(vlm: VLM, modules):
    """The config object the LM's attention modules read `_attn_implementation` from; refused when any module
    outside the LM (the vision tower) reads the same object."""
    config = modules[0].config
    if any(m.config is not config for m in vlm.decoder_layers.modules() if hasattr(m, "q_proj")):
        raise UsageError(f"{vlm.name}'s LM attention modules do not share one config")
    language_model = set(vlm.adapter.language_model(vlm.model).modules())
    outside = [name for name, m in vlm.model.named_modules()
               if getattr(m, "config", None) is config and m not in language_model]
    if outside:
        raise UsageError(f"{vlm.name}: modules outside the LM share the text config ({outside[:3]}); scaling the "
                         "LM's attention would reach them")
    return config


@contextmanager
def scale_image_attention(vlm: VLM, inputs, coefficient, layers=None):
    """Within the block, a full forward of `vlm` on `inputs` (the same batch) multiplies the last query row's
    pre-softmax scores at image-token keys by `coefficient` in every head of the LM decoder `layers` (None or
    "all": every layer): ScalingVis / AdaptVis (module docstring).

    coefficient: a number, or one per example (batch,), each finite and >= 0. All ones: nothing is installed
    (the model's own forward). Needs attn_implementation sdpa or eager (UsageError otherwise). The text config's
    attention implementation is restored on exit, error or not; the vision tower never sees the function."""
    layers = vlm.check_layers(layers)
    input_ids = inputs["input_ids"]
    coefficients = _coefficients(coefficient, input_ids.shape[0])
    modules = [vlm.attention_modules[layer] for layer in layers]
    config = _text_config(vlm, modules)
    base = config._attn_implementation
    if any(m in _ACTIVE for m in modules) or str(base).startswith(PREFIX):
        raise RuntimeError("scale_image_attention is already active on this model")
    if base not in BASES:
        raise UsageError(f"ScalingVis / AdaptVis need attn_implementation sdpa or eager, got {base}")
    changed = coefficients != 1
    installed = bool(changed.any())
    try:
        if installed:
            spec = _Scaling(coefficients.to(vlm.device, torch.float32), changed.to(vlm.device),
                            (input_ids == vlm.image_token_id).to(vlm.device))
            _ACTIVE.update({m: spec for m in modules})
            config._attn_implementation = PREFIX + base
        yield
    finally:
        if installed:
            config._attn_implementation = base
            for m in modules:
                _ACTIVE.pop(m, None)


@torch.no_grad()
def scaled_logits(vlm: VLM, inputs, coefficients, layers=None,
                  visual_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, vocab) last-position logits under ScalingVis with `coefficients` (a number or one per example);
    `visual_tokens` as in `VLM.last_logits`."""
    with scale_image_attention(vlm, inputs, coefficients, layers):
        return vlm.last_logits(inputs, visual_tokens)


def adaptvis_confidence(logits: torch.Tensor) -> torch.Tensor:
    """(batch,) float64 AdaptVis confidence of (batch, vocab) next-token logits: the largest softmax probability
    over the whole vocabulary (in float32), rounded to two decimals as the authors' `np.round(float(...), 2)`."""
    largest = torch.softmax(logits.float(), dim=-1).max(-1).values
    return torch.from_numpy(np.round(largest.double().cpu().numpy(), 2))


def choose_coefficients(confidences: torch.Tensor, threshold: float, weight1: float, weight2: float) -> torch.Tensor:
    """AdaptVis: (batch,) float32 coefficient per example, `weight1` where confidence < `threshold`, else
    `weight2` (the authors' `if uncertainty < threshold`)."""
    for name, weight in (("weight1", weight1), ("weight2", weight2)):
        if not (weight >= 0 and math.isfinite(weight)):
            raise UsageError(f"AdaptVis {name} must be >= 0 and finite, got {weight}")
    low = torch.as_tensor(confidences, dtype=torch.float64) < threshold
    return torch.where(low, torch.tensor(float(weight1)), torch.tensor(float(weight2))).float()


@torch.no_grad()
def adaptvis_coefficients(vlm: VLM, inputs, threshold: float, weight1: float, weight2: float,
                          logits: torch.Tensor | None = None) -> torch.Tensor:
    """(batch,) AdaptVis coefficients from the unmodified run's rounded confidence (`logits` of that run when
    already computed, else one plain forward), for `scaled_logits`."""
    logits = vlm.last_logits(inputs) if logits is None else logits
    return choose_coefficients(adaptvis_confidence(logits), threshold, weight1, weight2)


def adaptvis_rows(confidences: torch.Tensor, threshold: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AdaptVis outputs (batch, ...: logits or candidate probabilities) from the ScalingVis runs at weight1
    (`low`) and weight2 (`high`): each example takes the row of the run at its own coefficient, weight1 where its
    confidence < `threshold`. An example's output depends on its own coefficient only (nothing mixes examples),
    so this is `scaled_logits` with the per-example coefficients of `choose_coefficients`, without one more
    forward per (weight1, weight2, threshold) of a grid."""
    below = (torch.as_tensor(confidences, dtype=torch.float64) < threshold).to(low.device)
    return torch.where(below.reshape(-1, *[1] * (low.dim() - 1)), low, high)


# --- not ScalingVis: post-softmax reweighting of image keys (this repository's earlier operation) -------------

def _additive(mask, module, batch: int, q_len: int, k_len: int, dtype, device) -> torch.Tensor:
    """The attention mask the layer received, as a (batch or 1, 1, q_len, k_len) additive float mask: a
    boolean mask (sdpa) becomes 0 / dtype-min, None (sdpa's causal shortcut) becomes the causal mask."""
    lowest = torch.finfo(dtype).min
    if mask is None:
        if getattr(module, "is_causal", True) and q_len > 1:
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        else:
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        mask = allowed[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), dtype=dtype, device=device), torch.tensor(lowest, dtype=dtype))
    return mask[..., :k_len]


@contextmanager
def reweight_image_attention(vlm: VLM, inputs, coefficient, layers=None, queries: str = "last"):
    """NOT ScalingVis. Within the block, a full forward of `vlm` on `inputs` multiplies the post-softmax
    attention weights on image-token keys by `coefficient` and renormalises each row (w'_j = c w_j / Z at
    image keys, w_j / Z elsewhere), in the LM decoder `layers` (None: all), for the last query row ("last")
    or every row ("all"): log(c) added at image-key columns of the additive mask each layer's self-attention
    receives (forward pre-hooks, removed on exit, error or not). coefficient: a number or one per example, > 0."""
    check_choice("queries", queries, QUERIES)
    layers = vlm.check_layers(layers)
    input_ids = inputs["input_ids"]
    batch, seq = input_ids.shape
    log_coefficients = _coefficients(coefficient, batch, positive=True).log()
    image_keys = (input_ids == vlm.image_token_id)            # (batch, seq)
    rows = slice(seq - 1, seq) if queries == "last" else slice(0, seq)

    def add_log_coefficient(module, args, kwargs):
        implementation = getattr(module.config, "_attn_implementation", None)
        if implementation not in BASES:
            raise UsageError(f"image attention reweighting needs attn_implementation sdpa or eager, got {implementation}")
        if "attention_mask" not in kwargs:
            raise RuntimeError("the decoder layer did not pass attention_mask to self_attn by keyword; "
                               "this transformers version is not supported by steering.attention")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        q_len = hidden.shape[1]
        if q_len != seq:
            raise ValueError(f"image attention reweighting covers one full forward of {seq} positions, got {q_len} "
                             "(a cached or different input)")
        bias = torch.zeros(batch, 1, seq, seq, dtype=torch.float32, device=hidden.device)
        bias[:, 0, rows, :] = (log_coefficients.to(hidden.device, torch.float32)[:, None, None]
                               * image_keys.to(hidden.device)[:, None, :])
        mask = _additive(kwargs["attention_mask"], module, batch, q_len, seq, hidden.dtype, hidden.device)
        kwargs["attention_mask"] = mask + bias.to(hidden.dtype)
        return args, kwargs

    handles = []
    try:
        if bool((log_coefficients != 0).any()):       # all ones: nothing to change, not even the mask's form
            for layer in layers:
                attention = vlm.attention_modules[layer]
                handles.append(attention.register_forward_pre_hook(add_log_coefficient, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def reweighted_logits(vlm: VLM, inputs, coefficients, layers=None, queries: str = "last",
                      visual_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, vocab) last-position logits under `reweight_image_attention` (not ScalingVis)."""
    with reweight_image_attention(vlm, inputs, coefficients, layers, queries):
        return vlm.last_logits(inputs, visual_tokens)
