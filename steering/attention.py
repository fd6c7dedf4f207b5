"""ScalingVis and AdaptVis (Chen et al. 2025, "Why Is Spatial Reasoning Hard for VLMs?", arXiv 2503.01773):
scale the attention the language model pays to the image tokens, by a fixed coefficient (ScalingVis) or by one
chosen from the model's confidence (AdaptVis). The vision tower is untouched.

What the authors' code does (github.com/shiqichen17/AdaptVis, LLaVA-1.5): `model_zoo/llama/
modeling_llama_add_attn.py` multiplies, in every decoder layer and only in the prefill forward, the
pre-softmax scores of the last query position on the image keys by `weight`, then adds the mask and takes the
softmax. `model_zoo/llava15.py` (adapt_vis) first generates with weight 1, takes the largest softmax
probability of the first generated token over the whole vocabulary as the confidence, and generates again
with `weight1` when confidence < `threshold`, else `weight2` (README: weight1 0.5 or 0.8, weight2 1.2 to 2.0;
run.sh: 0.5, 1.5, threshold 0.4).

Here, as our issue asks, the coefficient c multiplies the post-softmax weights on image keys and each row is
renormalised: w'_j = c w_j / Z at image keys, w_j / Z at the others, Z = 1 + (c - 1) * (image share of the
row). That is log(c) added to the pre-softmax scores at image keys, applied as an additive attention mask, so
sdpa and eager attention run unchanged: c = 1 is the identity, rows still sum to 1, text-key ratios are kept
and w'_img / w'_text = c w_img / w_text. The authors' version is a temperature on image scores (s_j -> c s_j),
whose effect on each weight depends on its score: it sharpens (c > 1) or flattens (c < 1) the distribution
among image keys and moves the image share up or down with the scores' signs; it needs the scores themselves,
so it cannot be a mask. Their layers (all) and query rows (the last position) are the defaults here.
"""

import math
from contextlib import contextmanager

import torch

from common.errors import UsageError, check_choice
from vlm.models import VLM

QUERIES = ("last", "all")      # query rows that are rescaled: the last position (the authors'), or every one
IMPLEMENTATIONS = ("sdpa", "eager")


def _per_example(coefficients, batch: int) -> torch.Tensor:
    """(batch,) float64 coefficients from a number or a sequence/tensor of `batch` numbers, all > 0."""
    values = torch.as_tensor(coefficients, dtype=torch.float64).flatten().cpu()
    if values.numel() == 1:
        values = values.expand(batch)
    if values.numel() != batch:
        raise ValueError(f"{values.numel()} coefficients for a batch of {batch}")
    if not bool((values > 0).all()) or not bool(values.isfinite().all()):
        raise UsageError(f"attention coefficients must be positive and finite, got {values.tolist()}")
    return values


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
def scale_image_attention(vlm: VLM, inputs, coefficient, layers=None, queries: str = "last"):
    """Within the block, every forward of `vlm` on `inputs` (the same batch, one full forward, no cache)
    scales the attention paid to image-token keys by `coefficient` in the LM decoder `layers` (None: all).

    coefficient: a number, or one per example (batch,), each > 0. queries: "last" rescales the last position's
    attention row only (the authors' choice), "all" every row. The pre-hooks add log(coefficient) at image-key
    columns of the additive attention mask passed to each layer's self-attention; they are removed on exit,
    error or not. Needs attn_implementation sdpa or eager (UsageError otherwise)."""
    check_choice("queries", queries, QUERIES)
    layers = vlm.check_layers(layers)
    input_ids = inputs["input_ids"]
    batch, seq = input_ids.shape
    log_coefficients = _per_example(coefficient, batch).log()
    image_keys = (input_ids == vlm.image_token_id)            # (batch, seq)
    rows = slice(seq - 1, seq) if queries == "last" else slice(0, seq)

    def add_log_coefficient(module, args, kwargs):
        implementation = getattr(module.config, "_attn_implementation", None)
        if implementation not in IMPLEMENTATIONS:
            raise UsageError(f"image attention scaling needs attn_implementation sdpa or eager, got {implementation}")
        if "attention_mask" not in kwargs:
            raise RuntimeError("the decoder layer did not pass attention_mask to self_attn by keyword; "
                               "this transformers version is not supported by steering.attention")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        q_len = hidden.shape[1]
        if q_len != seq:
            raise ValueError(f"image attention scaling covers one full forward of {seq} positions, got {q_len} "
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
def scaled_logits(vlm: VLM, inputs, coefficients, layers=None, queries: str = "last",
                  visual_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, vocab) last-position logits with image attention scaled by `coefficients` (a number or one per
    example); `visual_tokens` as in `VLM.last_logits`."""
    with scale_image_attention(vlm, inputs, coefficients, layers, queries):
        return vlm.last_logits(inputs, visual_tokens)


def confidence(logits: torch.Tensor, scorer=None) -> torch.Tensor:
    """(batch,) confidence of (batch, vocab) next-token logits: the largest next-token probability over the
    vocabulary (the authors' measure, which they round to two decimals; not rounded here), or with an
    `AnswerScorer` the largest candidate probability."""
    if scorer is not None:
        return scorer.probabilities(logits).max(-1).values
    return torch.softmax(logits.float(), dim=-1).max(-1).values


def choose_coefficients(confidences: torch.Tensor, threshold: float, weight1: float = 0.5,
                        weight2: float = 1.2) -> torch.Tensor:
    """AdaptVis: (batch,) coefficient per example, `weight1` where confidence < `threshold` (unsure: smooth
    the attention), `weight2` otherwise (sure: sharpen it)."""
    for name, weight in (("weight1", weight1), ("weight2", weight2)):
        if not (weight > 0 and math.isfinite(weight)):
            raise UsageError(f"AdaptVis {name} must be positive, got {weight}")
    low = torch.full_like(confidences, float(weight1), dtype=torch.float32)
    return torch.where(confidences < threshold, low, torch.full_like(low, float(weight2)))


@torch.no_grad()
def adaptvis_coefficients(vlm: VLM, inputs, threshold: float, weight1: float = 0.5, weight2: float = 1.2,
                          scorer=None, logits: torch.Tensor | None = None) -> torch.Tensor:
    """(batch,) AdaptVis coefficients from the unmodified run's confidence (`logits` of that run when
    already computed, else one plain forward), for `scaled_logits`."""
    logits = vlm.last_logits(inputs) if logits is None else logits
    return choose_coefficients(confidence(logits, scorer), threshold, weight1, weight2)
