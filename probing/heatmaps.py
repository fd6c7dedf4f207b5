"""A probe applied to every visual token (paper Fig 4, 19-32): heat maps on the token grid and the strip
agreement number (drawn by probing.plots).

Heat maps over a split's images: `mean_prob[c]` is the mean over images of each token cell's probability of
class c; `argmax_map` is the per-cell mode of each image's argmax class (ties to the lower class), and
`argmax_agreement` the fraction of images whose argmax equals that mode.

Strip agreement: the fraction of non-item tokens whose argmax class equals the label of the nearest item,
distance measured along the probe's axes only (columns for a horizontal line or a column probe, rows for a
vertical line or a row probe, both for a grid's cell probe, Euclidean over them) from the token to the
item's token box (0 inside its span). Tokens equally near two items with different labels are left out.
"""

import numpy as np


def token_probabilities(probe, tokens: np.ndarray) -> np.ndarray:
    """(n_images, n_tokens, hidden) -> (n_images, n_tokens, k) the probe's class probabilities per token."""
    return probe.probabilities(tokens).astype(np.float32)


def nearest_item_labels(grid_shape, boxes: np.ndarray, labels: np.ndarray, axes) -> np.ndarray:
    """(rows * cols,) for each token, the label of the nearest item along `axes` (a subset of row, col);
    -1 at the items' own tokens and where two items with different labels are equally near.

    grid_shape (rows, cols); boxes (n_items, 4) token boxes (row0, col0, row1, col1); labels (n_items,).
    """
    rows, cols = (int(v) for v in grid_shape)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    dist = np.zeros((len(boxes), rows, cols))
    inside = np.zeros((rows, cols), bool)
    for k, (row0, col0, row1, col1) in enumerate(np.asarray(boxes)):
        d_row = np.maximum(0, np.maximum(row0 - r, r - (row1 - 1)))
        d_col = np.maximum(0, np.maximum(col0 - c, c - (col1 - 1)))
        dist[k] = np.sqrt(("row" in axes) * d_row ** 2 + ("col" in axes) * d_col ** 2)
        inside |= (d_row == 0) & (d_col == 0)
    labels = np.asarray(labels)
    out = labels[dist.argmin(0)]
    tied = ((dist == dist.min(0)) & (labels[:, None, None] != out)).any(0)
    out[tied | inside] = -1
    return out.reshape(-1)


def heat_map(predicted: np.ndarray, probs: np.ndarray, classes: np.ndarray, grid_shape):
    """(mean_prob (k, rows, cols), argmax_map (rows, cols), argmax_agreement (rows, cols)) from each
    image's argmax labels `predicted` (n_images, n_tokens) and probabilities `probs` (n_images, n_tokens, k)."""
    rows, cols = (int(v) for v in grid_shape)
    mean_prob = probs.mean(0).T.reshape(len(classes), rows, cols)
    counts = (predicted[..., None] == classes).sum(0)                       # (n_tokens, k)
    argmax_map = classes[counts.argmax(-1)].reshape(rows, cols)
    agreement = (counts.max(-1) / len(predicted)).reshape(rows, cols)
    return mean_prob.astype(np.float32), argmax_map, agreement.astype(np.float32)


def strip_agreement(predicted: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """(fraction of counted tokens where `predicted` == `expected`, tokens counted); both (n_images, n_tokens),
    `expected` -1 where a token is not counted (see nearest_item_labels)."""
    counted = expected >= 0
    if not counted.any():
        return float("nan"), 0
    return float((predicted[counted] == expected[counted]).mean()), int(counted.sum())
