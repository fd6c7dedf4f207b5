"""Visual embeddings of token-aligned images (the projector's output, one vector per visual token: docs/
experiments.md, "Where the model is read and written"), cached on disk so a probe can be refit or replotted without the model.

An arrangement is `horizontal` or `vertical` (three items in a line, position 0-2) or `NxN` (a grid of
shapes, position [row, col], paper B.4). From a seed it gives one sequence of distinct item arrangements;
a split is the slice [start, stop) of that sequence, so a training split [0, n_train) and a test split
[n_train, n_train + n_test) never share an image. One split is one file:

    <embeddings_dir>/<model>/<setting>/<arrangement>_seed<seed>_<start>-<stop>.npz

holding the embeddings and what is needed to label their tokens (see `Embeddings`). A What'sUp setting has
fixed images instead (data_gen.samples.setting_samples): its splits are [start, stop) of the composites with
boxes of a named split (train, test), cached as `<arrangement>_<split>_seed<seed>_<start>-<stop>.npz`. The file also stores
a key (model and setting config, arrangement, seed, slice, dtype); a file whose key differs is extracted
again, and so is every file when redo=true.
"""

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from common.errors import UsageError, check_choice
from common.geometry import ORIENTATIONS, Grid, Layout, grid_boxes, token_indices
from data_gen.pairs import shape_grid
from data_gen.render import Sample, draw_scene
from data_gen.samples import setting_samples, setting_source, whatsup_split
from data_gen.settings import Setting

EMBEDDING_DTYPES = ("float16", "float32")


@dataclass
class Embeddings:
    """One split: `tokens` (n_images, n_tokens, hidden) visual embeddings, tokens in row-major grid order.

    Per image: `image_id`, `orientation` (horizontal, vertical or grid). Per item (n_images, n_items, ...):
    `item_position` (n_images, n_items, 2) as [row, col] in grids and [position, -1] in lines, `item_box`
    (..., 4) token boxes (row0, col0, row1, col1), `item_tokens` (..., tokens_per_item) row-major token
    indices, padded with -1 where items differ in size (What'sUp boxes), `item_name`. `grid_shape` is (rows,
    cols); `first_image` (H, W, 3) uint8 is the split's first image, for drawing.
    """

    tokens: np.ndarray
    image_id: np.ndarray
    orientation: np.ndarray
    item_position: np.ndarray
    item_box: np.ndarray
    item_tokens: np.ndarray
    item_name: np.ndarray
    grid_shape: np.ndarray
    first_image: np.ndarray

    @classmethod
    def load(cls, path: Path) -> "Embeddings":
        with np.load(path, allow_pickle=False) as npz:
            return cls(**{name: npz[name] for name in cls.__dataclass_fields__})


def grid_size(arrangement: str) -> int | None:
    """n for an `NxN` grid arrangement, None for a line (horizontal, vertical)."""
    if arrangement in ORIENTATIONS:
        return None
    n, x, m = arrangement.partition("x")
    if x != "x" or not n.isdigit() or n != m or int(n) < 2:
        raise UsageError(f"unknown arrangement {arrangement!r}; allowed: horizontal, vertical, NxN grids (2x2, 3x3)")
    return int(n)


def count_arrangements(setting: Setting, arrangement: str) -> int:
    """How many distinct images of `arrangement` the setting can draw (items distinct unless a grid has more
    cells than the setting has items, as in data_gen.pairs.random_shape_grids)."""
    n = grid_size(arrangement)
    slots, items = (3 if n is None else n * n), len(setting.item_names)
    return items ** slots if slots > items else math.perm(items, slots)


def check_count(setting: Setting, arrangement: str, count: int) -> None:
    """UsageError when the setting has fewer than `count` distinct `arrangement` images (n_train + n_test)."""
    available = count_arrangements(setting, arrangement)
    if count > available:
        raise UsageError(f"n_train + n_test = {count} images, but setting {setting.name!r} has only {available} "
                         f"distinct {arrangement} arrangements; lower n_train or n_test")


def arrangement_names(setting: Setting, arrangement: str, seed: int, count: int) -> list[tuple[str, ...]]:
    """The first `count` distinct item arrangements (names in position / row-major order) drawn from `seed`;
    UsageError when the setting has fewer than `count`."""
    check_count(setting, arrangement, count)
    n = grid_size(arrangement)
    names = setting.item_names
    slots = 3 if n is None else n * n
    rng = np.random.default_rng(seed)
    seen, ordered = set(), []
    while len(ordered) < count:     # rejection sampling; `count` is at most the number available
        pick = tuple(names[j] for j in rng.choice(len(names), size=slots, replace=slots > len(names)))
        if pick not in seen:
            seen.add(pick)
            ordered.append(pick)
    return ordered


def arrangement_samples(setting: Setting, grid: Grid, layout: Layout, arrangement: str, seed: int,
                        start: int, stop: int) -> list[Sample]:
    """Images [start, stop) of the seeded sequence of distinct arrangements (not queried: no prompt)."""
    n = grid_size(arrangement)
    picks = arrangement_names(setting, arrangement, seed, stop)[start:stop]
    if n is None:
        return [draw_scene(setting, grid, layout, arrangement, names, None,
                           id=f"{setting.name}_{arrangement}_s{seed}_{start + k:05d}")
                for k, names in enumerate(picks)]
    return [shape_grid(setting, grid, layout, n, names, id=f"{setting.name}_{arrangement}_s{seed}_{start + k:05d}")
            for k, names in enumerate(picks)]


def check_arrangement(grid: Grid, layout: Layout, arrangement: str) -> None:
    """UsageError when `arrangement` is unknown or its items do not fit the model's token grid."""
    n = grid_size(arrangement)
    if n is not None:
        grid_boxes(grid, layout, n)


def samples_to_embeddings(samples: list[Sample], tokens: np.ndarray, grid: Grid) -> Embeddings:
    """Pack `samples`' metadata beside their `tokens` (n_images, n_tokens, hidden)."""
    def position(item):
        return list(item.position) if isinstance(item.position, list) else [item.position, -1]

    indices = [[token_indices(grid, i.token_box) for i in s.items] for s in samples]
    width = max(len(tokens) for per_image in indices for tokens in per_image)
    padded = [[tokens + [-1] * (width - len(tokens)) for tokens in per_image] for per_image in indices]

    return Embeddings(
        tokens=tokens,
        image_id=np.array([s.id for s in samples]),
        orientation=np.array([s.orientation for s in samples]),
        item_position=np.array([[position(i) for i in s.items] for s in samples], dtype=np.int64),
        item_box=np.array([[i.token_box for i in s.items] for s in samples], dtype=np.int64),
        item_tokens=np.array(padded, dtype=np.int64),
        item_name=np.array([[i.name for i in s.items] for s in samples]),
        grid_shape=np.array([grid.rows, grid.cols]),
        first_image=np.asarray(samples[0].image, dtype=np.uint8),
    )


def extract_tokens(vlm, samples: list[Sample], batch_size: int, dtype: str, desc: str) -> np.ndarray:
    """(n_images, n_tokens, hidden) visual embeddings of `samples`' images (VLM.image_embeddings), as `dtype`."""
    tokens = vlm.image_embeddings([s.image for s in samples], batch_size, desc=desc, device="cpu")
    return tokens.float().numpy().astype(dtype)


def split_path(cfg: DictConfig, setting: Setting, arrangement: str, start: int, stop: int,
               split: str | None = None) -> Path:
    name = arrangement if split is None else f"{arrangement}_{split}"
    return Path(cfg.embeddings_dir) / cfg.model.name / setting.name / f"{name}_seed{cfg.seed}_{start}-{stop}.npz"


def split_key(cfg: DictConfig, arrangement: str, start: int, stop: int, split: str | None = None) -> str:
    """What the cached embeddings depend on, as one JSON string."""
    key = {"model": OmegaConf.to_container(cfg.model, resolve=True),
           "setting": OmegaConf.to_container(cfg.setting, resolve=True),
           "arrangement": arrangement, "seed": cfg.seed, "start": start, "stop": stop, "dtype": cfg.embedding_dtype}
    if split is not None:
        key.update(split=split, data=OmegaConf.to_container(cfg.data, resolve=True))
    return json.dumps(key, sort_keys=True)


def split_samples(cfg: DictConfig, setting: Setting, arrangement: str, start: int, stop: int,
                  split: str | None = None) -> list[Sample]:
    """The images of one split: [start, stop) of the seeded arrangements (synthetic), or of the composites with
    boxes of `split` (What'sUp, horizontal only)."""
    if setting_source(cfg) == "synthetic":
        grid, layout = Grid.from_config(cfg.model.grid), Layout.from_config(cfg.model.layout)
        return arrangement_samples(setting, grid, layout, arrangement, cfg.seed, start, stop)
    if arrangement != "horizontal" or split is None:
        raise UsageError(f"setting {setting.name!r} has horizontal composites only, split by name; got {arrangement}")
    samples = setting_samples(cfg, split, queried=False, boxes=True)[start:stop]
    if not samples:
        raise UsageError(f"the What'sUp {split} split has no composites in [{start}, {stop}); "
                         f"raise setting.n_composites or change setting.splits")
    return samples


def save_embeddings(path: Path, emb: Embeddings, key: str) -> None:
    """Write `emb` and its key to `path` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, key=np.array(key), **vars(emb))
    os.replace(tmp, path)


def cached_key(path: Path) -> str | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return str(npz["key"]) if "key" in npz.files else None


def load_or_extract(cfg: DictConfig, setting: Setting, arrangement: str, start: int, stop: int,
                    get_vlm: Callable, split: str | None = None) -> tuple[Embeddings, Path]:
    """The split [start, stop) of `arrangement` (of What'sUp split `split`), from its cache file when that
    exists with the same key (and redo is false), otherwise extracted with `get_vlm()` (called only then)
    and cached."""
    check_choice("embedding_dtype", cfg.embedding_dtype, EMBEDDING_DTYPES)
    path, key = split_path(cfg, setting, arrangement, start, stop, split), split_key(cfg, arrangement, start, stop, split)
    if not cfg.redo and cached_key(path) == key:
        return Embeddings.load(path), path
    grid = Grid.from_config(cfg.model.grid)
    samples = split_samples(cfg, setting, arrangement, start, stop, split)
    vlm = get_vlm()
    tokens = extract_tokens(vlm, samples, cfg.batch_size, cfg.embedding_dtype,
                            desc=f"embeddings {vlm.name} {setting.name} {arrangement} [{start}, {stop})")
    if tokens.shape[1] != grid.n_tokens:
        raise ValueError(f"{vlm.name} gave {tokens.shape[1]} visual tokens, its grid has {grid.n_tokens}")
    emb = samples_to_embeddings(samples, tokens, grid)
    save_embeddings(path, emb, key)
    return emb, path


def whatsup_probe_composites(cfg: DictConfig, splits=(("train", "n_train"), ("test", "n_test"))) -> dict[str, dict]:
    """Per What'sUp split the probe reads: its composites with boxes (data_gen.samples.whatsup_split) and how many
    of them it uses (the first `cfg[key]`, null: all), as {split: {"n", "with_boxes", "dropped_box_not_found",
    "dropped_box_outside", "used"}}; UsageError in one line when a split has no composite with boxes."""
    records = {}
    for split, key in splits:
        composites, record = whatsup_split(cfg, split, boxes=True)
        if not composites:
            raise UsageError(f"the What'sUp {split} split has no composite whose objects have boxes ({record}): "
                             f"raise setting.n_composites or setting.splits.{split}, or check data.whatsup_boxes")
        n = cfg.get(key)
        records[split] = {**record, "used": len(composites) if n is None else min(int(n), len(composites))}
    return records
