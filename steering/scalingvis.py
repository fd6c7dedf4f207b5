"""ScalingVis and AdaptVis (Chen et al. 2025, "Why Is Spatial Reasoning Hard for VLMs? An Attention Mechanism
Perspective on Focus Areas", arXiv 2503.01773), exactly as the authors' code does them, as interventions on the
LM's attention-score sites (vlm/interventions.py, `ScaleScores`).

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

Here (`scalingvis_edits`): the coefficient c multiplies the pre-softmax scores (after the model's own scaling,
before the mask and the softmax) of the last query row at the image-token keys, in every head of the chosen LM
decoder layers (default: all), in the forward over the prompt; a cached decoding step is left alone, as theirs
(the interventions act on the prompt's forward only, vlm/scoring.py). c = 1 is the identity (the model's own
computation, bit for bit), c = 0 makes those scores 0 (not -inf), c > 1 sharpens and c < 1 flattens the last
row's distribution over image keys; keys that the mask hides stay hidden. Each example may have its own c
(AdaptVis).

Only the last query row changes, so every earlier position's states, keys and values are those of the plain run:
`scalingvis_rows` replays just the last position of a recorded plain forward (vlm/replay.py) under the
coefficient, attending to the record's keys and values, instead of a full forward per coefficient (equal to the
full forward, tests/test_attention_scaling.py).

Where transformers and the authors' LLaMA differ:
- the scale is the model's own (`scaling` as passed by the attention module): 1/sqrt(head_dim) for Qwen2-VL,
  `query_pre_attn_scalar ** -0.5` for Gemma 3; RoPE (Qwen2-VL's M-RoPE) and Gemma 3's q/k norms are already in
  the query and key the attention function receives;
- Gemma 3's sliding-window layers get their own (sliding) mask from the model; image keys outside the window
  are masked after the multiplication, as any masked key in the authors' code;
- soft-capping: transformers 5.24's `Gemma3Attention` does not pass `attn_logit_softcapping` to the attention
  function (the released Gemma 3 configs set it to None), so there is no cap to place. Were a `softcap` passed,
  the multiplication comes after it, on the capped score that enters the mask and the softmax, the place where
  the authors multiply (their LLaMA has no cap);
- the authors clamp `scores + mask` at the dtype's minimum before the softmax; with finite scores and
  transformers' finite masks this never changes a probability, so it is not repeated.

AdaptVis (`adaptvis_confidence`, `choose_coefficients`, `adaptvis_rows`): confidence = the largest softmax
probability over the vocabulary at the answer position of the unmodified run, rounded to two decimals as numpy
rounds; c = weight1 if confidence < threshold else weight2.
"""

import math

import numpy as np
import torch

from common.errors import UsageError
from vlm.interventions import ScaleScores, scores_site
from vlm.models import VLM
from vlm.replay import Record, Row, last_position_row


def coefficients_of(coefficients, batch: int, positive: bool = False) -> torch.Tensor:
    """(batch,) float64 coefficients from a number or a sequence/tensor of `batch` numbers, all finite and >= 0
    (> 0 with `positive`); UsageError otherwise."""
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


def image_keys(vlm: VLM, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: the image-token key columns."""
    return input_ids == vlm.image_token_id


def scalingvis_edits(vlm: VLM, input_ids: torch.Tensor, coefficients, layers=None) -> list[ScaleScores]:
    """The authors' operation on inputs `input_ids` (batch, seq): one ScaleScores per LM layer of `layers` (None or
    "all": every layer), the last query row's scores at image keys times the example's coefficient (a number or
    one per example, each finite and >= 0)."""
    factor = coefficients_of(coefficients, input_ids.shape[0]).float()
    keys = image_keys(vlm, input_ids)
    return [ScaleScores(scores_site(layer), factor, keys, "last") for layer in vlm.check_layers(layers)]


@torch.no_grad()
def scaled_logits(vlm: VLM, inputs, coefficients, layers=None, visual_tokens: torch.Tensor | None = None):
    """(batch, vocab) last-position logits of one full forward under ScalingVis with `coefficients` (a number or
    one per example); `visual_tokens` as in `VLM.last_logits`."""
    return vlm.last_logits(inputs, visual_tokens, scalingvis_edits(vlm, inputs["input_ids"], coefficients, layers))


def scalingvis_rows(vlm: VLM, records: list[Record], coefficients, layers=None) -> list[Row]:
    """One replay row per recorded plain forward (vlm/replay.py): its last position run again through every layer
    under ScalingVis with its coefficient (a number or one per record), attending to the record's keys and
    values. Score them with vlm.scoring.replayed_probabilities."""
    factor = coefficients_of(coefficients, len(records)).float()
    rows = []
    for record, c in zip(records, factor, strict=True):
        edits = scalingvis_edits(vlm, record.inputs["input_ids"], c[None], layers)
        rows.append(last_position_row(record, edits))
    return rows


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
    already computed, else one plain forward), for `scaled_logits` or `scalingvis_rows`."""
    logits = vlm.last_logits(inputs) if logits is None else logits
    return choose_coefficients(adaptvis_confidence(logits), threshold, weight1, weight2)


def adaptvis_rows(confidences: torch.Tensor, threshold: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AdaptVis outputs (batch, ...: logits or candidate probabilities) from the ScalingVis runs at weight1
    (`low`) and weight2 (`high`): each example takes the row of the run at its own coefficient, weight1 where its
    confidence < `threshold`. An example's output depends on its own coefficient only (nothing mixes examples),
    so this is ScalingVis with the per-example coefficients of `choose_coefficients`, without one more forward per
    (weight1, weight2, threshold) of a grid."""
    below = (torch.as_tensor(confidences, dtype=torch.float64) < threshold).to(low.device)
    return torch.where(below.reshape(-1, *[1] * (low.dim() - 1)), low, high)
