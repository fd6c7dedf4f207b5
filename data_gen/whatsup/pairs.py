"""Clean/counterfactual pairs of What'sUp composites for the patching figures' What'sUp panels (paper App. B.1,
B.2; docs/experiments.md, "What'sUp composites").

Mirror pairs (object and strip patching): a composite (X left of the reference, Y right of it) against its
mirror, same query, so the mirror's answer is the other object. `mirror: data` (the default) takes the mirror
from the data: the composite of the dataset's own photos of Y left of and X right of the same reference, so
both patched regions hold the same objects and only their order differs (the paper's design rule, section
5.2.2). A composite whose mirror photos are not in the directory has no data mirror and is left out (counted):
appendix B omits results "when sufficient clean/counterfactual input pairs cannot be generated", which only
data-built pairs can cause. `mirror: flip` (an option) flips the composite left to right instead, which also
mirrors each object's appearance.

Object patching on a data mirror: an object's box differs between the photo of it left of the reference and
the photo of it right of it, so each side's patched region is the covering box of the object's box in the
clean composite and its box in the mirror, moved onto the clean side (`object_boxes`): clean left <- mirror
right is then a translation by the parts' offset, as strip patching is, and each region holds the object in
both images. This needs the side parts to be equally wide (symmetric `setting.cuts`).
"""

from dataclasses import replace

import numpy as np
from PIL import Image

from common.errors import UsageError, check_choice
from common.geometry import Grid, TokenBox
from data_gen.pairs import LastTokenPair, MirrorPair
from data_gen.render import Sample
from data_gen.settings import TARGET_POSITION, Setting
from data_gen.whatsup.composites import DIRECTIONS, Composite, WhatsUp, composite_samples

MIRRORS = ("data", "flip")


def mirrored_sample(sample: Sample, grid: Grid, id: str) -> Sample:
    """`sample` flipped left to right (`mirror: flip`): each object keeps its identity, the order swaps (item 0
    becomes item 2), boxes and strips are mirrored, the query stays and so the answer is the other object."""
    def flip(box, width):
        return None if box is None else (width - box[2], box[1], width - box[0], box[3])

    def flip_token(box):
        return None if box is None else (box[0], grid.cols - box[3], box[2], grid.cols - box[1])

    items = [replace(item, position=2 - item.position, pixel_box=flip(item.pixel_box, grid.width),
                     token_box=flip_token(item.token_box)) for item in reversed(sample.items)]
    answer = items[TARGET_POSITION[sample.direction]].answer if sample.direction else None
    return replace(sample, id=id, items=items, strips=[flip_token(strip) for strip in reversed(sample.strips)],
                   answer=answer, image=sample.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def _cover(a: TokenBox, b: TokenBox) -> TokenBox:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _shift(box: TokenBox, cols: int) -> TokenBox:
    return box[0], box[1] + cols, box[2], box[3] + cols


def data_mirror_object_boxes(clean: Composite, mirror: Composite) -> tuple[list[TokenBox], list[TokenBox]]:
    """(clean's, mirror's) token boxes [left, reference, right] that object patching swaps on a data mirror pair
    (module docstring): each side the covering box of the object's two boxes, the mirror's moved by the offset
    between the side parts."""
    offset = clean.columns[2] - clean.columns[0]
    left = _cover(clean.items[0].token_box, _shift(mirror.items[2].token_box, -offset))       # X in both
    right = _cover(clean.items[2].token_box, _shift(mirror.items[0].token_box, offset))       # Y in both
    return ([left, clean.items[1].token_box, right],
            [_shift(right, -offset), mirror.items[1].token_box, _shift(left, offset)])


def whatsup_mirror_pairs(data: WhatsUp, n: int, seed: int, mirror: str = "data",
                         boxes: bool = False) -> tuple[list[MirrorPair], dict]:
    """`n` mirror pairs of What'sUp composites (module docstring), and a record of what was left out.

    Each pair: a composite queried left or right (alternating) against its mirror (`mirror`: data or flip), same
    query. `boxes` (object patching): only composites whose items, and whose mirror's, have boxes. Composites
    drawn with `seed` from the usable ones, without repeats while there are enough. Record: {"mirror", "n": the
    composites, "without_data_mirror", "without_boxes", "usable"}. UsageError when none is usable."""
    check_choice("setting.mirror", mirror, MIRRORS)
    if not data.composites:
        raise UsageError("no What'sUp composites to pair: check data.whatsup_dir and setting.n_composites")
    columns = data.columns
    if mirror == "data" and columns[1] - columns[0] != columns[3] - columns[2]:
        raise UsageError(f"setting.cuts give side parts of {columns[1] - columns[0]} and {columns[3] - columns[2]} "
                         f"token columns: a data mirror patches one side onto the other, so they must be equal "
                         f"(symmetric cuts), or use setting.mirror=flip")
    usable, no_mirror, no_boxes = [], 0, 0
    for composite in data.composites:
        other = data.mirror(composite) if mirror == "data" else None
        if mirror == "data" and other is None:
            no_mirror += 1
        elif boxes and not (composite.has_boxes and (other is None or other.has_boxes)):
            no_boxes += 1
        else:
            usable.append((composite, other))
    record = {"mirror": mirror, "n": len(data.composites), "without_data_mirror": no_mirror,
              "without_boxes": no_boxes, "usable": len(usable)}
    if not usable:
        raise UsageError(f"no What'sUp composite can be paired with its {mirror} mirror ({record}): "
                         f"{'the directory lacks the mirror photos' if no_mirror else 'boxes are missing'}")
    order = np.random.default_rng([seed, 3]).permutation(len(usable))
    pairs = []
    for k in range(n):
        composite, other = usable[order[k % len(usable)]]
        clean = composite_samples(composite, data.setting, (DIRECTIONS[k % 2],))[0]
        clean = replace(clean, id=f"{clean.id}_{k:04d}_clean")
        if other is None:
            counterfactual = mirrored_sample(clean, data.grid, clean.id.replace("_clean", "_mirror"))
            object_boxes = None
        else:
            counterfactual = composite_samples(other, data.setting, (clean.direction,))[0]
            counterfactual = replace(counterfactual, id=f"{clean.id.removesuffix('_clean')}_mirror")
            object_boxes = data_mirror_object_boxes(composite, other) if boxes else None
        pairs.append(MirrorPair(clean, counterfactual, clean.answer, counterfactual.answer, object_boxes))
    return pairs, record


def whatsup_last_token_pairs(composites: list[Composite], setting: Setting, n: int, seed: int) -> list[LastTokenPair]:
    """`n` last-token pairs of What'sUp composites, as the synthetic ones (paper Fig 3): a clean composite
    (a, m, b) queried towards a, and a counterfactual composite (c, m, e) with the same reference m and two other
    objects, queried the opposite way. Clean composites drawn with `seed`; each takes the first composite (in a
    seeded order) that shares its reference and none of its objects; UsageError when none has such a partner."""
    rng = np.random.default_rng([seed, 4])
    order = [composites[i] for i in rng.permutation(len(composites))]
    candidates = []
    for composite in order:
        objects = {composite.items[0].name, composite.items[2].name}
        partner = next((other for other in order if other.items[1].name == composite.items[1].name
                        and not objects & {other.items[0].name, other.items[2].name}), None)
        if partner is not None:
            candidates.append((composite, partner))
    if not candidates:
        raise UsageError("no two What'sUp composites share a reference with four different objects: last-token "
                         "pairs need them (raise setting.n_composites, or use more photographs)")
    pairs = []
    for k in range(n):
        composite, partner = candidates[k % len(candidates)]
        direction = DIRECTIONS[k % 2]
        opposite = DIRECTIONS[1 - k % 2]
        clean = composite_samples(composite, setting, (direction,))[0]
        counterfactual = composite_samples(partner, setting, (opposite,))[0]
        clean = replace(clean, id=f"{clean.id}_{k:04d}_clean")
        counterfactual = replace(counterfactual, id=f"{counterfactual.id}_{k:04d}_counterfactual")
        ordering = clean.items[TARGET_POSITION[opposite]].answer
        pairs.append(LastTokenPair(clean, counterfactual, clean.answer, ordering, counterfactual.answer))
    return pairs
