"""Linear probes on visual embeddings (paper section 5.1): a scikit-learn LogisticRegression, after optional
standardisation, trained on item tokens to predict an item's position; saved as plain arrays so steering
can read the class directions without scikit-learn.

    probe = load_probe(unit_dir(cfg, "probes"), "horizontal")
    probe.directions()          # (3, hidden) unit vectors in raw embedding space, one per position
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from common.errors import UsageError, check_choice

FIELDS = ("weight", "bias", "mean", "scale", "classes")


@dataclass
class Probe:
    """p(class | x) = softmax(((x - mean) / scale) @ weight.T + bias), over `classes` (a one-vs-rest probe,
    fit_probe(rows="one_vs_rest"), holds its k binary logits: its class is their argmax, as here).

    weight (k, hidden), bias (k,), mean and scale (hidden,) of the standardisation (0 and 1 without it),
    classes (k,) int labels. A two-class scikit-learn model (one logit z) is stored as logits (-z/2, z/2),
    which gives the same probabilities, so every probe here is a k-way softmax.
    """

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    classes: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(..., hidden) embeddings -> (..., k) logits, computed in float64."""
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        return z @ self.weight.T.astype(np.float64) + self.bias

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(..., hidden) -> (..., k) class probabilities."""
        logits = self.logits(x)
        logits -= logits.max(-1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(-1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(..., hidden) -> (...,) the most probable class label."""
        return self.classes[self.logits(x).argmax(-1)]

    def directions(self, unit: bool = True) -> np.ndarray:
        """(k, hidden) the class directions in raw embedding space, weight / scale (the gradient of each
        class logit with respect to the embedding), each of norm 1 when `unit`. Steering adds
        alpha * directions()[c] to a visual token to push it towards class c."""
        d = self.weight / self.scale
        return d / np.linalg.norm(d, axis=-1, keepdims=True) if unit else d

    def to_arrays(self, name: str) -> dict:
        """{f"{name}.{field}": array} for a results unit's arrays.npz."""
        return {f"{name}.{field}": getattr(self, field) for field in FIELDS}

    @classmethod
    def from_arrays(cls, arrays, name: str) -> "Probe":
        missing = [f"{name}.{field}" for field in FIELDS if f"{name}.{field}" not in arrays]
        if missing:
            raise UsageError(f"no probe {name!r} in these arrays (missing {', '.join(missing)})")
        return cls(**{field: np.asarray(arrays[f"{name}.{field}"]) for field in FIELDS})


ROWS = ("multinomial", "one_vs_rest")


def fit_probe(x: np.ndarray, y: np.ndarray, C: float = 1.0, standardize: bool = True,
              max_iter: int = 1000, seed: int = 0, rows: str = "multinomial") -> Probe:
    """Fit LogisticRegression(C) on `x` (n, hidden) and labels `y` (n,), after StandardScaler if
    `standardize`. UsageError when fewer than two classes are present.

    `rows`: multinomial (one softmax over the k classes; its k weight rows sum to about zero, since adding a
    vector to every row leaves the softmax unchanged and the L2 penalty picks the zero-mean rows) or one_vs_rest
    (k binary regressions, class i against the others; row i and bias i are regression i's, and the class
    predicted is the largest of the k logits, as scikit-learn's one-vs-rest predicts). Steering's "every token
    gets every class direction" reading needs one-vs-rest rows: multinomial rows would cancel.

    The fit runs on one BLAS / OpenMP thread: L-BFGS makes hundreds of small vector operations, and on a
    16-core machine spreading each over 16 threads made a probe unit 3x slower (docs/performance.md)."""
    classes = np.unique(y)
    if len(classes) < 2:
        raise UsageError(f"a probe needs at least two classes in its training tokens, got {classes.tolist()}")
    x = np.asarray(x, np.float64)
    if standardize:
        scaler = StandardScaler().fit(x)
        mean, scale = scaler.mean_, scaler.scale_      # scale_ is 1 where a feature is constant
    else:
        mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    check_choice("probe rows", rows, ROWS)
    z = (x - mean) / scale
    with threadpool_limits(limits=1):
        if rows == "one_vs_rest":
            fits = [LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(z, y == c) for c in classes]
            weight = np.concatenate([fit.coef_ for fit in fits])
            bias = np.concatenate([fit.intercept_ for fit in fits])
            return Probe(weight.astype(np.float32), bias.astype(np.float32), mean.astype(np.float32),
                         scale.astype(np.float32), classes.astype(np.int64))
        model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(z, y)
    weight, bias = model.coef_, model.intercept_
    if len(classes) == 2:
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    return Probe(weight.astype(np.float32), bias.astype(np.float32), mean.astype(np.float32),
                 scale.astype(np.float32), model.classes_.astype(np.int64))


def fit_item_probe(probe_cfg, seed: int, tokens: np.ndarray, item_tokens: np.ndarray,
                   labels: np.ndarray, rows: str = "multinomial") -> tuple[Probe, dict]:
    """A probe fit on every item token of one embedding split (see item_examples) with the config's `C`,
    `standardize` and `max_iter` (`rows` as in fit_probe), and its training numbers (train_accuracy,
    n_train_images, n_train_tokens)."""
    x, y = item_examples(tokens, item_tokens, labels)
    probe = fit_probe(x, y, C=probe_cfg.C, standardize=probe_cfg.standardize, max_iter=probe_cfg.max_iter,
                      seed=seed, rows=rows)
    return probe, {"train_accuracy": float((probe.predict(x) == y).mean()), "n_train_images": len(tokens),
                   "n_train_tokens": len(y)}


def item_examples(tokens: np.ndarray, item_tokens: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every item token of every image with its item's label.

    tokens (n_images, n_tokens, hidden), item_tokens (n_images, n_items, tokens_per_item) token indices (-1:
    padding, skipped), labels (n_images, n_items) -> x (n_item_tokens, hidden), y (n_item_tokens,), in image,
    item, token order.
    """
    n_images, n_items, per_item = item_tokens.shape
    flat = item_tokens.reshape(n_images, -1)
    x = np.take_along_axis(tokens, np.maximum(flat, 0)[..., None], axis=1)
    y = np.repeat(labels, per_item, axis=1)
    keep = flat >= 0
    return x[keep], y[keep]


def load_probe(unit_dir: Path, orientation: str) -> Probe:
    """The probe saved in a results unit: `orientation` is horizontal or vertical for results/probes/...,
    and a grid probe's name (2x2_row, 3x3_cell, ...) for results/grid_probes/...."""
    path = Path(unit_dir) / "arrays.npz"
    if not path.exists():
        raise UsageError(f"no probe results at {unit_dir}; run python -m runner experiment=probes first")
    with np.load(path, allow_pickle=False) as npz:
        return Probe.from_arrays(npz, orientation)
