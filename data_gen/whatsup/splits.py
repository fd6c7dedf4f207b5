"""Splits of the What'sUp composites (`setting.splits`, default 60/10/30 train/val/test): disjoint by composite,
drawn with the seed alone from the one set of composites (before any box filter), so every experiment sees the
same splits."""

from collections.abc import Mapping

import numpy as np
from omegaconf import DictConfig

from common.errors import UsageError
from data_gen.whatsup.composites import Composite, load_composites


def _fractions(fractions: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    names = list(fractions)
    values = np.array([float(fractions[name]) for name in names])
    if len(names) == 0 or (values < 0).any() or abs(values.sum() - 1) > 1e-6:
        raise UsageError(f"setting.splits fractions must be non-negative and sum to 1, got {dict(fractions)}")
    return names, values


def split_bounds(n: int, fractions: Mapping[str, float]) -> dict[str, tuple[int, int]]:
    """[start, stop) of each split in a permutation of `n` composites: the cumulative fractions times n, rounded,
    the last split ending at n."""
    names, values = _fractions(fractions)
    bounds = np.round(np.cumsum(values) * n).astype(int)
    bounds[-1] = n
    starts = [0, *bounds[:-1].tolist()]
    return {name: (start, stop) for name, start, stop in zip(names, starts, bounds.tolist(), strict=True)}


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Composites per split when `n` composites are split by `fractions`, exactly as `split_composites` cuts
    them (the runner's dry run counts passes with it)."""
    return {name: stop - start for name, (start, stop) in split_bounds(n, fractions).items()}


def split_composites(composites: list[Composite], fractions: Mapping[str, float], seed: int
                     ) -> dict[str, list[Composite]]:
    """Disjoint splits by composite, sized by `split_sizes`, drawn with `seed`, each in pair order. Composites of
    different splits may still share a photo (one photo pairs with many others), never a composite image."""
    order = np.random.default_rng([seed, 1]).permutation(len(composites))
    return {name: [composites[i] for i in sorted(order[start:stop].tolist())]
            for name, (start, stop) in split_bounds(len(composites), fractions).items()}


def load_splits(cfg: DictConfig) -> dict[str, list[Composite]]:
    """`load_composites(cfg)` split by `cfg.setting.splits` with `cfg.seed`."""
    return split_composites(load_composites(cfg), cfg.setting.splits, cfg.seed)


def require_splits(sizes: Mapping[str, int], names, what: str, fractions=None) -> None:
    """UsageError in one line when a split of `names` is missing or has no composite (`sizes`: composites per
    split; `what` says who needs it)."""
    allowed = ", ".join(sizes)
    for name in names:
        if name not in sizes:
            raise UsageError(f"{what} needs a {name} split; setting.splits has {allowed}")
        if sizes[name] == 0:
            given = f"setting.splits={dict(fractions)}" if fractions is not None else "setting.splits"
            raise UsageError(f"{given} leaves the {name} split empty ({sum(sizes.values())} composites): {what} "
                             f"needs at least one {name} composite; give {name} a larger fraction or raise "
                             f"setting.n_composites")
