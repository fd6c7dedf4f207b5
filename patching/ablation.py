"""Ablation of vision-derived ordering (docs/experiments.md, "ablation"; paper section 4.3): every item's visual tokens are
replaced by the same item's tokens from an image where it sits alone in the middle, and every other token by
the empty image's token. What is left is which items there are, not where they are."""

import torch
from tqdm import tqdm

from common.geometry import Grid, Layout, line_boxes, token_indices
from data_gen.pairs import ablation_sources
from data_gen.render import Sample
from data_gen.settings import Setting
from vlm.models import VLM


class Ablator:
    """Builds ablated visual embeddings for samples of one setting, computing the embeddings of each isolated
    item image (one per orientation and item) and of the empty image once."""

    def __init__(self, vlm: VLM, setting: Setting, grid: Grid, layout: Layout, batch_size: int = 16):
        self.vlm, self.setting, self.grid, self.layout, self.batch_size = vlm, setting, grid, layout, batch_size
        self._isolated: dict[tuple[str, str], torch.Tensor] = {}
        self._empty: torch.Tensor | None = None

    def prepare(self, samples: list[Sample]) -> None:
        """Embed every isolated-item image and the empty image that `samples` need and are not cached yet
        (only samples with an item not seen before have their source images drawn)."""
        todo: dict[tuple[str, str], object] = {}
        for sample in samples:
            keys = [(sample.orientation, item.name) for item in sample.items]
            if all(key in self._isolated or key in todo for key in keys) and self._empty is not None:
                continue
            sources = ablation_sources(sample, self.setting, self.grid, self.layout)
            for key, alone in zip(keys, sources.isolated, strict=True):
                if key not in self._isolated:
                    todo[key] = alone.image
            if self._empty is None:
                self._empty = self.vlm.image_embeddings([sources.empty], 1)[0]
        if todo:
            embedded = self.vlm.image_embeddings(list(todo.values()), self.batch_size)
            self._isolated.update(zip(todo, embedded, strict=True))

    def ablated(self, sample: Sample) -> torch.Tensor:
        """(tokens, hidden) ablated visual embeddings of `sample`."""
        self.prepare([sample])
        tokens = self._empty.clone()
        middle = token_indices(self.grid, line_boxes(self.grid, self.layout, sample.orientation)[1])
        for item in sample.items:
            tokens[token_indices(self.grid, item.token_box)] = self._isolated[(sample.orientation, item.name)][middle]
        return tokens

    def ablated_batch(self, samples: list[Sample], desc: str = "ablating") -> torch.Tensor:
        """(n, tokens, hidden) ablated visual embeddings of `samples`."""
        self.prepare(samples)
        return torch.stack([self.ablated(s) for s in tqdm(samples, desc=desc, unit="image", leave=False)])
