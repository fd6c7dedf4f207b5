"""Clean/counterfactual pairs and source images for the experiments of SPEC section 4, all from a seed."""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_gen.render import Item, Sample, compose, draw_scene, query_plan
from data_gen.scenes import Grid, Layout, grid_boxes, line_boxes, pixel_box
from data_gen.settings import OPPOSITE, TARGET_POSITION, Setting
from vlm.cli import UsageError


@dataclass
class Pair:
    """A clean sample, its counterfactual, and the answers each outcome of patching would give.

    targets: {"clean": answer of the clean run, ...}; last-token pairs add "ordering" (the clean image's item
    at the counterfactual's target position) and "value" (the counterfactual's own answer); mirror pairs
    add "swapped" (the clean image's item on the other side)."""

    clean: Sample
    counterfactual: Sample
    targets: dict


def _need(setting: Setting, count: int, what: str) -> list[str]:
    names = [i.name for i in setting.items]
    if len(names) < count:
        raise UsageError(f"{what} needs {count} distinct items, setting {setting.name!r} has {len(names)}")
    return names


def last_token_pairs(setting: Setting, grid: Grid, layout: Layout, n: int, seed: int) -> list[Pair]:
    """Clean (a, m, b) queried towards a; counterfactual (c, m', e) of other items, same orientation, queried
    the opposite way (answer e). Patching the last position transfers ordering if the answer becomes b and
    value if it becomes e."""
    names = _need(setting, 6, "last-token patching")
    rng = np.random.default_rng(seed)
    pairs = []
    for k, (orientation, direction) in enumerate(query_plan(n)):
        pick = [names[j] for j in rng.choice(len(names), size=6, replace=False)]
        clean = draw_scene(setting, grid, layout, orientation, pick[:3], direction, id=f"{setting.name}_lt{k:04d}_clean")
        other = OPPOSITE[direction]
        cf = draw_scene(setting, grid, layout, orientation, pick[3:], other, id=f"{setting.name}_lt{k:04d}_cf")
        targets = {"clean": clean.answer, "ordering": clean.items[TARGET_POSITION[other]].answer, "value": cf.answer}
        pairs.append(Pair(clean, cf, targets))
    return pairs


def mirror_pairs(setting: Setting, grid: Grid, layout: Layout, n: int, seed: int) -> list[Pair]:
    """Clean (a, m, b) and its mirror (b, m, a), same query. Swapping the side items' tokens (or strips) from
    the mirror into the clean run moves the answer from a ("clean") to b ("swapped") if they carry ordering."""
    names = _need(setting, 3, "mirror pairs")
    rng = np.random.default_rng(seed)
    pairs = []
    for k, (orientation, direction) in enumerate(query_plan(n)):
        a, m, b = [names[j] for j in rng.choice(len(names), size=3, replace=False)]
        clean = draw_scene(setting, grid, layout, orientation, [a, m, b], direction, id=f"{setting.name}_mr{k:04d}_clean")
        cf = draw_scene(setting, grid, layout, orientation, [b, m, a], direction, id=f"{setting.name}_mr{k:04d}_cf")
        swapped = clean.items[2 - TARGET_POSITION[direction]].answer
        pairs.append(Pair(clean, cf, {"clean": clean.answer, "swapped": swapped}))
    return pairs


def isolated_middle_image(setting: Setting, grid: Grid, layout: Layout, orientation: str, name: str) -> Sample:
    """The item alone at the middle position of a `orientation` layout (no question)."""
    spec = setting.item(name)
    box = line_boxes(grid, layout, orientation)[1]
    item = Item(spec.name, spec.answer, 1, pixel_box(grid, box), box)
    return Sample(f"{setting.name}_alone_{name.replace(' ', '_')}_{orientation}", setting.name, orientation,
                  [item], [], None, None, None, compose(grid, [(spec, box)], setting.background))


def empty_image(grid: Grid, background=(255, 255, 255)) -> Image.Image:
    return Image.new("RGB", (grid.width, grid.height), tuple(background))


def ablation_sources(setting: Setting, grid: Grid, layout: Layout, sample: Sample) -> tuple[list[Sample], Image.Image]:
    """For the ablation of ordering: each of the sample's items alone in the middle, and the empty image."""
    alone = [isolated_middle_image(setting, grid, layout, sample.orientation, item.name) for item in sample.items]
    return alone, empty_image(grid, setting.background)


def shape_grid(setting: Setting, grid: Grid, layout: Layout, n: int, names, id: str = "grid") -> Sample:
    """An n x n grid of items (paper B.4), `names` in row-major order; positions are [row, col]."""
    if len(names) != n * n:
        raise UsageError(f"a {n} x {n} grid needs {n * n} items, got {len(names)}")
    boxes = [box for row in grid_boxes(grid, layout, n) for box in row]
    specs = [setting.item(name) for name in names]
    items = [Item(s.name, s.answer, [k // n, k % n], pixel_box(grid, b), b)
             for k, (s, b) in enumerate(zip(specs, boxes, strict=True))]
    return Sample(id, setting.name, "grid", items, [], None, None, None,
                  compose(grid, list(zip(specs, boxes, strict=True)), setting.background))


def random_shape_grids(setting: Setting, grid: Grid, layout: Layout, n: int, n_images: int, seed: int) -> list[Sample]:
    """`n_images` n x n grids; items drawn with replacement when the grid has more cells than the setting has items."""
    rng = np.random.default_rng(seed)
    names = [i.name for i in setting.items]
    cells = n * n
    return [shape_grid(setting, grid, layout, n,
                       [names[j] for j in rng.choice(len(names), size=cells, replace=cells > len(names))],
                       id=f"{setting.name}_grid{n}_{k:04d}") for k in range(n_images)]
