"""Amplifying the ordering directions of a position probe in the visual embeddings (paper section 5.4,
equation 3, Table 3): emb_t <- emb_t + alpha * direction, at every visual token t.

Which direction a token gets (the paper leaves it open, so both are here; docs/experiments.md, "amplification"):
- `predicted` (default): the unit direction of the class the probe predicts for that token (before the
  change), so each token is pushed further towards the position it already encodes;
- `every_class`: the sum of every class direction, the same vector at every token.
A baseline replaces the probe's directions by random ones of the same norms (`random_directions`), assigned
to tokens the same way.
"""

import math

import numpy as np
import torch

from common.errors import check_choice

VARIANTS = ("predicted", "every_class")


def token_classes(probe, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, n_tokens) index (into probe.classes) of the class `probe` predicts for each token of `tokens`
    (batch, n_tokens, hidden)."""
    logits = probe.logits(tokens.detach().float().cpu().numpy())
    return torch.from_numpy(logits.argmax(-1))


def amplify(tokens: torch.Tensor, directions: torch.Tensor, alpha: float, variant: str = "predicted",
            classes: torch.Tensor | None = None) -> torch.Tensor:
    """`tokens` (batch, n_tokens, hidden) with alpha times a direction added to every token, in float32.

    directions (k, hidden), one per probe class; `classes` (batch, n_tokens) indices into them, needed by
    the `predicted` variant (see module docstring). alpha = 0 returns the tokens unchanged."""
    check_choice("amplification variant", variant, VARIANTS)
    tokens = tokens.float()
    directions = directions.to(tokens.device, torch.float32)
    if variant == "every_class":
        return tokens + alpha * directions.sum(0)
    if classes is None:
        raise ValueError("the predicted variant needs each token's class")
    return tokens + alpha * directions[classes.to(tokens.device)]


def random_directions(norms: np.ndarray, hidden: int, seed: int) -> np.ndarray:
    """(k, hidden) Gaussian directions drawn with `seed`, direction i rescaled to norm `norms[i]`."""
    d = np.random.default_rng([seed, 2]).normal(size=(len(norms), hidden))
    return (d / np.linalg.norm(d, axis=-1, keepdims=True) * np.asarray(norms)[:, None]).astype(np.float32)


def outcome_metrics(before: np.ndarray, after: np.ndarray) -> dict:
    """Accuracy of `after` and what changed from `before` (both boolean correct-or-not per sample, (n,)):
    corrected = fraction of the previously wrong answers now right, broken = fraction of the previously right
    answers now wrong (NaN when there were none)."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)

    def fraction(mask, values):
        return float(values[mask].mean()) if mask.any() else math.nan

    return {"accuracy": float(after.mean()), "corrected": fraction(~before, after),
            "broken": fraction(before, ~after), "n": int(len(after)), "n_wrong_before": int((~before).sum())}


def choose(accuracies) -> int:
    """Index of the best accuracy, the earliest on ties (the smallest alpha, or the first grid value)."""
    return int(np.argmax(np.asarray(accuracies)))
