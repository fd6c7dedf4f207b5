"""Clean/counterfactual pairs and source images for the experiments (docs/experiments.md, "Experiments"), all from a seed.

Each builder cycles through the (orientation, direction) combinations, so the pairs are balanced over
orientations and queried directions, and draws its items with a numpy Generator seeded by `seed`.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from common.errors import UsageError, check_choice
from common.geometry import ORIENTATIONS, Grid, Layout, TokenBox, grid_boxes, line_boxes, pixel_box
from data_gen.render import Item, Sample, compose, distinct_items, draw_scene, query_plan
from data_gen.settings import OPPOSITE, TARGET_POSITION, Setting

COUNTERFACTUALS = ("shared_reference", "all_distinct")


@dataclass
class LastTokenPair:
    """Clean (a, m, b) queried towards a and counterfactual (c, m, e) with the clean's reference m and two other
    side items, same orientation, queried the opposite way (the paper's Fig 3: Red-Green-Blue "left of green"
    against Gray-Green-Black "right of green"). After patching the last position from the counterfactual run
    the model says `clean_answer` (a: nothing moved), `ordering_answer` (b: the clean image's item at the
    counterfactual's target position, so the ordering moved) or `value_answer` (e: the answer itself moved).
    The `all_distinct` design (an option, not the paper's) draws the counterfactual's reference too: (c, m', e).
    """

    clean: Sample
    counterfactual: Sample
    clean_answer: str
    ordering_answer: str
    value_answer: str

    @property
    def targets(self) -> dict[str, str]:
        return {"clean": self.clean_answer, "ordering": self.ordering_answer, "value": self.value_answer}


@dataclass
class MirrorPair:
    """Clean (a, m, b) and its mirror (b, m, a), same query: the clean answer is `clean_answer` (a), the
    mirror's is `swapped_answer` (b). Synthetic side items keep their token boxes, so patching swaps them in
    place. `object_boxes`, when given, are the (clean's, mirror's) token boxes [left, middle, right] that object
    patching swaps instead of the items' own boxes (a What'sUp data mirror, whose objects' boxes differ between
    its photos: data_gen/whatsup/pairs.py)."""

    clean: Sample
    counterfactual: Sample
    clean_answer: str
    swapped_answer: str
    object_boxes: tuple[list[TokenBox], list[TokenBox]] | None = None

    @property
    def targets(self) -> dict[str, str]:
        return {"clean": self.clean_answer, "swapped": self.swapped_answer}

    def regions(self, region: str) -> tuple[list[TokenBox], list[TokenBox]]:
        """(clean's, mirror's) token boxes, one per item, that patching `region` (items or strips) swaps."""
        if region == "strips":
            return self.clean.strips, self.counterfactual.strips
        if self.object_boxes is not None:
            return self.object_boxes
        return [item.token_box for item in self.clean.items], [item.token_box for item in self.counterfactual.items]


@dataclass
class AblationSources:
    """What the ablation copies from, for one sample: `isolated[i]` is the sample's item i alone at the
    middle position (same orientation), `empty` the image with no item."""

    isolated: list[Sample]
    empty: Image.Image


def last_token_pairs(setting: Setting, grid: Grid, layout: Layout, n: int, seed: int,
                     orientations=ORIENTATIONS, counterfactual: str = "shared_reference") -> list[LastTokenPair]:
    """`n` last-token pairs (docs/experiments.md, "last_token"): `counterfactual` is `shared_reference` (the
    paper's: (c, m, e), five distinct items) or `all_distinct` ((c, m', e), six). UsageError when the setting
    has too few items."""
    check_choice("last-token counterfactual", counterfactual, COUNTERFACTUALS)
    rng = np.random.default_rng(seed)
    pairs = []
    for k, (orientation, direction) in enumerate(query_plan(n, orientations)):
        opposite = OPPOSITE[direction]
        if counterfactual == "shared_reference":
            a, m, b, c, e = distinct_items(setting, rng, 5, "a last-token pair")
            # the counterfactual's target (e) sits where the clean's other side item (b) is, c opposite it
            cf_names = [c, m, e] if TARGET_POSITION[opposite] == 2 else [e, m, c]
        else:
            a, m, b, *cf_names = distinct_items(setting, rng, 6, "a last-token pair")
        clean_names = [a, m, b] if TARGET_POSITION[direction] == 0 else [b, m, a]
        clean = draw_scene(setting, grid, layout, orientation, clean_names, direction,
                           id=f"{setting.name}_lasttoken{k:04d}_clean")
        counterfactual_sample = draw_scene(setting, grid, layout, orientation, cf_names, opposite,
                                           id=f"{setting.name}_lasttoken{k:04d}_counterfactual")
        ordering = clean.items[TARGET_POSITION[opposite]].answer
        pairs.append(LastTokenPair(clean, counterfactual_sample, clean.answer, ordering,
                                   counterfactual_sample.answer))
    return pairs


def mirror_pairs(setting: Setting, grid: Grid, layout: Layout, n: int, seed: int,
                 orientations=ORIENTATIONS) -> list[MirrorPair]:
    """`n` mirror pairs (object_patching, strip_patching, ablated_patching)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for k, (orientation, direction) in enumerate(query_plan(n, orientations)):
        first, middle, last = distinct_items(setting, rng, 3, "a mirror pair")
        clean = draw_scene(setting, grid, layout, orientation, [first, middle, last], direction,
                           id=f"{setting.name}_mirror{k:04d}_clean")
        mirror = draw_scene(setting, grid, layout, orientation, [last, middle, first], direction,
                            id=f"{setting.name}_mirror{k:04d}_mirror")
        pairs.append(MirrorPair(clean, mirror, clean.answer, mirror.answer))
    return pairs


def isolated_middle_image(setting: Setting, grid: Grid, layout: Layout, orientation: str, name: str) -> Sample:
    """Item `name` alone at the middle position (1) of an `orientation` layout; not queried, no strips."""
    spec = setting.item(name)
    box = line_boxes(grid, layout, orientation)[1]
    item = Item(spec.name, spec.answer, 1, pixel_box(grid, box), box)
    return Sample(f"{setting.name}_alone_{orientation}_{name.replace(' ', '-')}", setting.name, orientation,
                  [item], [], None, None, None, compose(grid, [(spec, box)], setting.background))


def empty_image(grid: Grid, background=(255, 255, 255)) -> Image.Image:
    """The grid-sized RGB image with no item."""
    return Image.new("RGB", (grid.width, grid.height), tuple(background))


def ablation_sources(sample: Sample, setting: Setting, grid: Grid, layout: Layout) -> AblationSources:
    """For the ablation of ordering (docs/experiments.md, "ablation"): each of `sample`'s items alone in the middle, in
    item order, and the empty image."""
    if sample.orientation not in ORIENTATIONS:
        raise UsageError(f"ablation sources need a horizontal or vertical sample, got {sample.orientation!r}")
    isolated = [isolated_middle_image(setting, grid, layout, sample.orientation, item.name) for item in sample.items]
    return AblationSources(isolated, empty_image(grid, setting.background))


def shape_grid(setting: Setting, grid: Grid, layout: Layout, n: int, names, id: str | None = None) -> Sample:
    """An n x n grid of items (paper B.4), `names` in row-major order; orientation "grid", positions
    [row, col], no strips, not queried. LayoutError when it does not fit."""
    names = list(names)
    if len(names) != n * n:
        raise UsageError(f"a {n} x {n} grid needs {n * n} items, got {len(names)}")
    boxes = [box for row in grid_boxes(grid, layout, n) for box in row]
    specs = [setting.item(name) for name in names]
    items = [Item(spec.name, spec.answer, [k // n, k % n], pixel_box(grid, box), box)
             for k, (spec, box) in enumerate(zip(specs, boxes, strict=True))]
    grid_id = id or f"{setting.name}_grid{n}_" + "_".join(names).replace(" ", "-")
    return Sample(grid_id, setting.name, "grid", items, [], None, None, None,
                  compose(grid, list(zip(specs, boxes, strict=True)), setting.background))


def random_shape_grids(setting: Setting, grid: Grid, layout: Layout, n: int, n_images: int,
                       seed: int) -> list[Sample]:
    """`n_images` random n x n grids from `seed`. Items are distinct when the setting has enough of them
    (2 x 2), otherwise drawn with replacement (3 x 3 from six shapes)."""
    rng = np.random.default_rng(seed)
    names = setting.item_names
    cells = n * n
    return [shape_grid(setting, grid, layout, n,
                       [names[j] for j in rng.choice(len(names), size=cells, replace=cells > len(names))],
                       id=f"{setting.name}_grid{n}_{k:04d}") for k in range(n_images)]
