"""What the LM is shown in place of some training images' own visual embeddings (the dual organism's training;
configs/dual_organism.yaml says why each mode is there)."""

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from common.errors import UsageError
from common.geometry import Grid, Layout, line_boxes, strip_box, token_indices
from data_gen.pairs import empty_image, isolated_middle_image

ABLATED, SHUFFLED, STRIPS_PERMUTED, AS_DRAWN = range(4)      # what an image's visual embeddings become


class VisualMix:
    """What the LM is shown in place of some training images' own visual embeddings (train.shuffle, train.ablate,
    train.drop_items; configs/dual_organism.yaml says why). Per training image, one of:
    - ablated (probability `ablate`): every item's tokens <- the same item's tokens from an image where it sits
      alone in the middle, every other token <- the empty image's (the ablation experiment's operation, with
      the model as it is at that step): the visual embeddings carry no order, only where tokens sit; with
      `flat_background`, every other token <- the mean of the empty image's tokens, so that the background
      does not say where it is either and the items' places are all that is left;
    - shuffled (probability `shuffle`): the visual tokens permuted at random among the image slots, so where a
      token sits says nothing and only what the vision tower wrote into it carries order;
    - strips permuted (probability `permute_strips`): the three items' strips (strip patching's regions) change
      places, each strip's tokens kept in their order, the answer still the drawn image's: where the tokens sit
      tells a coherent but wrong order, and the LM learns to follow what the tokens carry (strip patching at
      the visual embeddings then moves the answer, Fig 7);
    - as drawn (otherwise).
    Images not ablated have each item's own tokens replaced by the empty image's with probability `drop_items`
    per item (before any shuffle), so the answer has to come from the tokens around the item; with `drop_strips`,
    each other token of a dropped item's strip goes the same way with that probability, so what is left of the
    item is spread over its strip."""

    # the five orders of three strips other than their own (strip at place p <- strip order[p])
    PERMUTATIONS = ((1, 0, 2), (0, 2, 1), (2, 1, 0), (1, 2, 0), (2, 0, 1))

    def __init__(self, shuffle: float = 0.0, ablate: float = 0.0, drop_items: float = 0.0,
                 permute_strips: float = 0.0, drop_strips: float = 0.0, flat_background: bool = False):
        for name, value in (("shuffle", shuffle), ("ablate", ablate), ("drop_items", drop_items),
                            ("permute_strips", permute_strips), ("drop_strips", drop_strips)):
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"train.{name} must be a probability in [0, 1], got {value}")
        if shuffle + ablate + permute_strips > 1.0:
            raise UsageError(f"train.shuffle + train.ablate + train.permute_strips must be at most 1, got "
                             f"{shuffle} + {ablate} + {permute_strips}")
        self.shuffle, self.ablate, self.drop_items, self.permute_strips = shuffle, ablate, drop_items, permute_strips
        self.drop_strips, self.flat_background = drop_strips, bool(flat_background)

    @classmethod
    def from_config(cls, tcfg: DictConfig) -> "VisualMix":
        return cls(tcfg.shuffle, tcfg.ablate, tcfg.drop_items, tcfg.permute_strips, tcfg.drop_strips,
                   tcfg.ablate_flat)

    def at(self, step: int, ramp_steps: int) -> "VisualMix":
        """The mix at training step `step`: every probability grows linearly from 0 to its own over the first
        `ramp_steps` steps (0: from the start)."""
        scale = min(1.0, step / ramp_steps) if ramp_steps else 1.0
        return VisualMix(self.shuffle * scale, self.ablate * scale, self.drop_items * scale,
                         self.permute_strips * scale, self.drop_strips, self.flat_background)

    @property
    def active(self) -> bool:
        return self.shuffle > 0 or self.ablate > 0 or self.drop_items > 0 or self.permute_strips > 0

    def card(self) -> dict:
        return {"shuffle": self.shuffle, "ablate": self.ablate, "drop_items": self.drop_items,
                "permute_strips": self.permute_strips, "drop_strips": self.drop_strips,
                "flat_background": self.flat_background}

    def choose(self, rng: np.random.Generator, n: int) -> "MixChoice":
        """What happens to each of `n` images: its mode and which of its three items are dropped."""
        modes = rng.choice(4, size=n, p=[self.ablate, self.shuffle, self.permute_strips,
                                         1.0 - self.ablate - self.shuffle - self.permute_strips])
        dropped = rng.random((n, 3)) < self.drop_items
        dropped[modes == ABLATED] = False
        return MixChoice(modes, dropped)

    def apply(self, tokens: torch.Tensor, samples: list, choice: "MixChoice", settings: dict, grid: Grid,
              layout: Layout, embed, rng: np.random.Generator) -> torch.Tensor:
        """`tokens` (images, tokens, hidden) of `samples` (one per image) after the mix `choice` (drawn by
        `choose`); `embed(images)` gives plain visual embeddings (no gradient) of source images; `rng` draws the
        shuffles and strip orders."""
        modes, dropped = choice.modes, choice.dropped
        needs = sorted({s.setting for s, mode, drop in zip(samples, modes, dropped, strict=True)
                        if mode == ABLATED or drop.any()})
        empty = dict(zip(needs, embed([empty_image(grid, settings[name].background) for name in needs]),
                         strict=True)) if needs else {}
        keys = sorted({(s.setting, s.orientation, item.name) for s, mode in zip(samples, modes, strict=True)
                       if mode == ABLATED for item in s.items})
        isolated = {}
        if keys:
            images = [isolated_middle_image(settings[name], grid, layout, orientation, item).image
                      for name, orientation, item in keys]
            isolated = dict(zip(keys, embed(images), strict=True))
        out = []
        for k, (sample, mode) in enumerate(zip(samples, modes, strict=True)):
            own = tokens[k]
            if mode == ABLATED:
                own = empty[sample.setting].clone()
                if self.flat_background:
                    own[:] = own.mean(0)
                middle = token_indices(grid, line_boxes(grid, layout, sample.orientation)[1])
                for item in sample.items:
                    source = isolated[(sample.setting, sample.orientation, item.name)]
                    own[token_indices(grid, item.token_box)] = source[middle]
            elif dropped[k].any():
                keep = torch.ones(own.shape[0], 1, device=own.device)
                for item, drop in zip(sample.items, dropped[k], strict=True):
                    if drop:
                        keep[token_indices(grid, item.token_box)] = 0.0
                        if self.drop_strips:
                            strip = token_indices(grid, strip_box(grid, layout, item.token_box, sample.orientation))
                            gone = [i for i, lost in zip(strip, rng.random(len(strip)) < self.drop_strips,
                                                         strict=True) if lost]
                            keep[gone] = 0.0
                own = own * keep + empty[sample.setting] * (1.0 - keep)
            if mode == SHUFFLED:
                own = own[torch.from_numpy(rng.permutation(own.shape[0])).to(own.device)]
            elif mode == STRIPS_PERMUTED:
                strips = [token_indices(grid, strip_box(grid, layout, item.token_box, sample.orientation))
                          for item in sample.items]
                order = self.PERMUTATIONS[rng.integers(len(self.PERMUTATIONS))]
                index = torch.arange(own.shape[0], device=own.device)
                for place, source in enumerate(order):
                    index[strips[place]] = torch.tensor(strips[source], device=own.device)
                own = own[index]
            out.append(own)
        return torch.stack(out)


@dataclass(frozen=True)
class MixChoice:
    """Per image of a batch: its mode (ABLATED, SHUFFLED, STRIPS_PERMUTED or AS_DRAWN) and (n, 3) which items'
    own tokens are dropped."""

    modes: np.ndarray
    dropped: np.ndarray

    def subset(self, index) -> "MixChoice":
        return MixChoice(self.modes[index], self.dropped[index])

    @property
    def ablated(self) -> np.ndarray:
        return self.modes == ABLATED
