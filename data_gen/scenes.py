"""Geometry on the visual token grid, and nothing else: every other module asks this one where things are.

Token boxes are (row0, col0, row1, col1) and pixel boxes (x0, y0, x1, y1), both exclusive. Visual token k
sits at row k // cols, column k % cols.
"""

from dataclasses import dataclass

from vlm.cli import UsageError

ORIENTATIONS = ("horizontal", "vertical")
TokenBox = tuple[int, int, int, int]


class LayoutError(UsageError, ValueError):
    """Items or strips that do not fit the grid."""


@dataclass(frozen=True)
class Grid:
    """The model's visual token grid: rows x cols tokens of pixels_per_token x pixels_per_token pixels."""

    rows: int
    cols: int
    pixels_per_token: int

    @property
    def width(self) -> int:
        return self.cols * self.pixels_per_token

    @property
    def height(self) -> int:
        return self.rows * self.pixels_per_token


@dataclass(frozen=True)
class Layout:
    """Item size, gap between neighbouring items and strip width, all in tokens (paper Table 6)."""

    item_tokens: int
    gap_tokens: int
    strip_tokens: int


def _check_fits(grid: Grid, box: TokenBox, what: str) -> TokenBox:
    r0, c0, r1, c1 = box
    if r0 < 0 or c0 < 0 or r1 > grid.rows or c1 > grid.cols:
        raise LayoutError(f"{what} at token box {list(box)} does not fit the {grid.rows} x {grid.cols} grid")
    return box


def line_boxes(grid: Grid, layout: Layout, orientation: str, n_items: int = 3, offset=(0, 0)) -> list[TokenBox]:
    """Token boxes of `n_items` items in a row (horizontal) or column (vertical), `gap_tokens` apart, centred
    (rounded down) and shifted by `offset` = (rows, cols); in position order (left->right, top->bottom)."""
    if orientation not in ORIENTATIONS:
        raise LayoutError(f"unknown orientation {orientation!r}; allowed: {', '.join(ORIENTATIONS)}")
    size, gap = layout.item_tokens, layout.gap_tokens
    span = n_items * size + (n_items - 1) * gap
    along, across = (grid.cols, grid.rows) if orientation == "horizontal" else (grid.rows, grid.cols)
    if span > along or size > across:
        raise LayoutError(f"{n_items} items of {size} tokens with gaps of {gap} span {span} tokens, "
                          f"more than the {along} tokens of the grid")
    start, side = (along - span) // 2, (across - size) // 2
    boxes = []
    for i in range(n_items):
        a0 = start + i * (size + gap)
        box = (side, a0, side + size, a0 + size) if orientation == "horizontal" else (a0, side, a0 + size, side + size)
        box = (box[0] + offset[0], box[1] + offset[1], box[2] + offset[0], box[3] + offset[1])
        boxes.append(_check_fits(grid, box, f"item {i}"))
    return boxes


def strip_box(grid: Grid, layout: Layout, item_box: TokenBox, orientation: str) -> TokenBox:
    """The item's strip: the full-height column band (horizontal layouts) or full-width row band (vertical)
    of `strip_tokens` tokens centred on the item (extra token on the far side when the difference is odd)."""
    r0, c0, r1, c1 = item_box
    lo, hi = (c0, c1) if orientation == "horizontal" else (r0, r1)
    start = lo - (layout.strip_tokens - (hi - lo)) // 2
    box = (0, start, grid.rows, start + layout.strip_tokens) if orientation == "horizontal" \
        else (start, 0, start + layout.strip_tokens, grid.cols)
    return _check_fits(grid, box, "strip")


def grid_boxes(grid: Grid, layout: Layout, n: int) -> list[list[TokenBox]]:
    """n x n items (paper B.4 grids) with the same size and gaps, centred: boxes[row][col]."""
    rows = line_boxes(grid, layout, "vertical", n)
    cols = line_boxes(grid, layout, "horizontal", n)
    return [[(r[0], c[1], r[2], c[3]) for c in cols] for r in rows]


def pixel_box(grid: Grid, box: TokenBox) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixels of a token box."""
    p = grid.pixels_per_token
    r0, c0, r1, c1 = box
    return c0 * p, r0 * p, c1 * p, r1 * p


def token_indices(grid: Grid, box: TokenBox) -> list[int]:
    """Row-major visual token indices (k = row * cols + col) inside a token box."""
    r0, c0, r1, c1 = box
    return [r * grid.cols + c for r in range(r0, r1) for c in range(c0, c1)]
