"""Amplifying the ordering directions of a position probe in the visual embeddings (paper section 5.4,
equation 3, Table 3): emb_t <- emb_t + alpha * probe_i, at every visual token t.

probe_i is the probe's own weight row for class i expressed in the visual-embedding space: with a
standardising probe, logit_i = ((x - mean) / scale) @ w_i + b_i, so the row is w_i / scale (the gradient of
logit_i with respect to x), added as it is, so that alpha has the paper's scale (`directions: probe`). The
unit-norm variant (`directions: unit`, an option of ours, not the paper's) adds alpha times w_i / |w_i| instead.

Which class a token gets is open in the paper ("probe_i is the probe direction corresponding to object i ... We
apply this intervention to all visual token embeddings, across all probe directions"); two readings
(`directions_per_token`, docs/experiments.md, "amplification"):
- predicted (the default): each token gets the direction of the class the probe predicts for it (before the
  change), so each token is pushed further towards the position it already encodes;
- all: every token gets every class direction, alpha * (probe_0 + probe_1 + probe_2). A multinomial probe's rows
  sum to about zero (the softmax is unchanged by adding one vector to every row, and the L2 penalty picks the
  zero-mean rows), so this reading uses one-vs-rest rows (probing.probes.fit_probe(rows="one_vs_rest")).
A baseline replaces the probe's directions by random ones of the same norms (`random_directions`), given to the
tokens by the same reading.
"""

import math

import numpy as np
import torch

from common.errors import check_choice

DIRECTION_SCALES = ("probe", "unit")
DIRECTIONS_PER_TOKEN = ("predicted", "all")


def class_directions(probe, scale: str = "probe") -> np.ndarray:
    """(k, hidden) float32 class directions of `probe` in the embedding space: its rows w_i / scale as they are
    (`probe`, the paper's equation 3), or each normalised to norm 1 (`unit`)."""
    check_choice("amplification directions", scale, DIRECTION_SCALES)
    return probe.directions(unit=scale == "unit").astype(np.float32)


def token_classes(probe, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, n_tokens) index (into probe.classes) of the class `probe` predicts for each token of `tokens`
    (batch, n_tokens, hidden)."""
    logits = probe.logits(tokens.detach().float().cpu().numpy())
    return torch.from_numpy(logits.argmax(-1))


def amplify(tokens: torch.Tensor, directions: torch.Tensor, alpha: float,
            classes: torch.Tensor | None = None) -> torch.Tensor:
    """`tokens` (batch, n_tokens, hidden) with alpha * directions[classes[b, t]] added to token t of example b
    (`directions_per_token: predicted`), or, with `classes` None, alpha * the sum of every direction added to every
    token (`all`); in float32. directions (k, hidden), one per probe class; classes (batch, n_tokens) indices into
    them. alpha = 0 returns the tokens unchanged."""
    tokens = tokens.float()
    directions = directions.to(tokens.device, torch.float32)
    if classes is None:
        return tokens + alpha * directions.sum(0)
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
