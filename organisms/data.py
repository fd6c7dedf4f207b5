"""The organisms' training data: every question of the synthetic settings, split by item triple into the questions
trained on and the held-out test split, grouped by image, and drawn into training batches.

Every ordered triple of distinct items of each setting in `train.settings`, both orientations, both queried
directions of each. A seeded `train.held_out` fraction of each setting's triples is never trained on: the test
split. A batch is `train.batch_size / 2` images with both queried directions of each (the questions of one image
share its pixels and their prompt's prefix). With `train.offsets`, a training image is redrawn with its line of
items shifted by a random whole-token offset that still fits the grid (the test split keeps the centred layout
the experiments use).
"""

import hashlib
import itertools
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from common.cli import CONFIG_DIR
from common.errors import check_choice
from common.geometry import Grid, Layout, line_offsets
from data_gen.render import Sample, draw_scene
from data_gen.settings import DIRECTIONS_OF, Setting


def question_splits(setting: Setting, grid: Grid, layout: Layout, held_out: float, seed: int):
    """(train, test) Samples: every ordered triple of distinct items x orientation x queried direction, the
    triples split at random (seeded) so that a `held_out` fraction of them appear only in the test split."""
    triples = list(itertools.permutations(setting.item_names, 3))
    order = np.random.default_rng(seed).permutation(len(triples))
    n_test = max(1, round(held_out * len(triples)))
    chosen = {"test": [triples[i] for i in order[:n_test]], "train": [triples[i] for i in order[n_test:]]}
    return tuple([draw_scene(setting, grid, layout, orientation, triple, direction,
                             id=f"{setting.name}_{'-'.join(triple)}_{orientation}_{direction}")
                  for triple in chosen[split] for orientation, directions in DIRECTIONS_OF.items()
                  for direction in directions] for split in ("train", "test"))


def synthetic_settings(names) -> dict[str, Setting]:
    """setting name -> Setting for `names`, each checked to be a synthetic setting of configs/setting/ (What'sUp
    photographs have no item triples to draw)."""
    configs = {path.stem: OmegaConf.load(path) for path in sorted((Path(CONFIG_DIR) / "setting").glob("*.yaml"))}
    synthetic = [name for name, config in configs.items() if config.get("source", "synthetic") == "synthetic"]
    for name in names:
        check_choice("train.settings entry", name, synthetic)
    return {name: Setting.from_config(configs[name]) for name in names}


class Questions:
    """The training questions of the settings in `tcfg.settings` (grouped by image) and each setting's test split."""

    def __init__(self, tcfg: DictConfig, grid: Grid, layout: Layout, seed: int, tokenizer):
        self.grid, self.layout = grid, layout
        self.settings = synthetic_settings(tcfg.settings)
        splits = {name: question_splits(setting, grid, layout, tcfg.held_out, seed)
                  for name, setting in self.settings.items()}
        self.test = {name: test for name, (_, test) in splits.items()}
        self.held_out_fraction = tcfg.held_out
        self.n_train = {name: len(train) for name, (train, _) in splits.items()}
        by_image: dict[str, list[Sample]] = {}          # an image's questions (both directions of its orientation)
        for train, _ in splits.values():
            for sample in train:
                by_image.setdefault(sample.id.rsplit("_", 1)[0], []).append(sample)
        self.images = list(by_image.values())
        # the answer's first token: what the loss asks for at the last input position
        self.target = {s.answer: tokenizer(s.answer, add_special_tokens=False)["input_ids"][0]
                       for group in self.images for s in group}
        self.offsets = {o: line_offsets(grid, layout, o) for o in DIRECTIONS_OF}

    @property
    def questions_per_image(self) -> int:
        return len(self.images[0])

    def card(self) -> dict:
        return {name: {"train_questions": self.n_train[name], "test_questions": len(test),
                       "held_out_fraction": self.held_out_fraction} for name, test in self.test.items()}

    def draw(self, rng: np.random.Generator, n_images: int, offsets) -> list[list[Sample]]:
        """`n_images` distinct training images (each a list of its questions), drawn with `rng`; with `offsets`
        (true: every image; a number in (0, 1): that fraction) redrawn with the items shifted."""
        images = [self.images[i] for i in rng.choice(len(self.images), n_images, replace=False)]
        if offsets:
            share = 1.0 if offsets is True else float(offsets)
            images = [self.shifted(group, rng) if rng.random() < share else group for group in images]
        return images

    def shifted(self, group: list[Sample], rng: np.random.Generator) -> list[Sample]:
        """The questions of one image, redrawn with its line of items at one random fitting offset."""
        first = group[0]
        choices = self.offsets[first.orientation]
        offset = choices[rng.integers(len(choices))]
        return [draw_scene(self.settings[s.setting], self.grid, self.layout, s.orientation,
                           [item.name for item in s.items], s.direction, offset=offset) for s in group]

    def answer_ids(self, questions: list[Sample], device) -> torch.Tensor:
        return torch.tensor([self.target[s.answer] for s in questions], device=device)


class CachedImageProcessor:
    """An image processor that remembers each distinct image's output (its tensors, float16 pixels): the training
    set has a few hundred images per setting, seen thousands of times. For processors whose output is per-image
    tensors concatenated along the first axis (`train.cache_pixels` in configs/organism.yaml says which);
    everything else is the wrapped processor's."""

    def __init__(self, processor):
        self.processor = processor
        self._cache: dict[str, dict] = {}

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, images, return_tensors="pt"):
        parts = [self._one(image) for image in images]
        return {key: torch.cat([p[key] for p in parts]).float() if parts[0][key].is_floating_point()
                else torch.cat([p[key] for p in parts]) for key in parts[0]}

    def _one(self, image):
        key = hashlib.sha1(image.tobytes()).hexdigest()
        if key not in self._cache:
            out = self.processor(images=[image], return_tensors="pt")
            self._cache[key] = {k: v.half() if v.is_floating_point() else v for k, v in out.items()
                                if isinstance(v, torch.Tensor)}
        return self._cache[key]
