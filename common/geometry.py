"""Geometry on the visual token grid, with no drawing: where items, strips and grids of items sit.

Every other module asks this one. A token box is `(row0, col0, row1, col1)` and a pixel box is
`(x0, y0, x1, y1)`, both with exclusive ends. Visual token k sits at row k // cols, column k % cols.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import UsageError, check_choice

TokenBox = tuple[int, int, int, int]
PixelBox = tuple[int, int, int, int]

ORIENTATIONS = ("horizontal", "vertical")


class LayoutError(UsageError, ValueError):
    """Items, strips or an offset that do not fit the token grid (one-line message, CLI exit code 2)."""


def _positive_ints(what: str, values: Mapping, allow_zero: tuple[str, ...] = ()) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key in allow_zero else 1):
            least = "a non-negative" if key in allow_zero else "a positive"
            raise LayoutError(f"{what}.{key} must be {least} integer, got {value!r}")


def _from_mapping(cls, what: str, cfg: Mapping):
    keys = list(cls.__dataclass_fields__)
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise LayoutError(f"{what} config lacks {', '.join(missing)} (needs {', '.join(keys)})")
    return cls(**{k: cfg[k] for k in keys})


@dataclass(frozen=True)
class Grid:
    """The model's visual token grid: `rows` x `cols` tokens of `pixels_per_token` px (config `model.grid`)."""

    rows: int
    cols: int
    pixels_per_token: int

    def __post_init__(self):
        _positive_ints("grid", {"rows": self.rows, "cols": self.cols, "pixels_per_token": self.pixels_per_token})

    @property
    def width(self) -> int:
        return self.cols * self.pixels_per_token

    @property
    def height(self) -> int:
        return self.rows * self.pixels_per_token

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols

    @classmethod
    def from_config(cls, cfg: Mapping) -> "Grid":
        return _from_mapping(cls, "grid", cfg)


@dataclass(frozen=True)
class Layout:
    """Item geometry in tokens (config `model.layout`): item side, empty tokens between neighbours, strip width."""

    item_tokens: int
    gap_tokens: int
    strip_tokens: int

    def __post_init__(self):
        _positive_ints("layout", {"item_tokens": self.item_tokens, "gap_tokens": self.gap_tokens,
                                  "strip_tokens": self.strip_tokens}, allow_zero=("gap_tokens",))

    def span(self, n_items: int) -> int:
        """Tokens covered along the axis by `n_items` items and the gaps between them."""
        return n_items * self.item_tokens + (n_items - 1) * self.gap_tokens

    @classmethod
    def from_config(cls, cfg: Mapping) -> "Layout":
        return _from_mapping(cls, "layout", cfg)


def _check_inside(grid: Grid, box: TokenBox, what: str) -> None:
    row0, col0, row1, col1 = box
    if row0 < 0 or col0 < 0 or row1 > grid.rows or col1 > grid.cols or row0 >= row1 or col0 >= col1:
        raise LayoutError(f"{what} rows [{row0}, {row1}) x cols [{col0}, {col1}) does not fit the "
                          f"{grid.rows} x {grid.cols} token grid")


def line_boxes(grid: Grid, layout: Layout, orientation: str, n_items: int = 3,
               offset: tuple[int, int] | None = None) -> list[TokenBox]:
    """Token boxes of `n_items` items in a row (horizontal) or column (vertical), in position order.

    Items are `item_tokens` square with `gap_tokens` empty tokens between neighbours, centred on the grid
    (the odd leftover token goes right / below); `offset=(d_row, d_col)` then shifts all of them.
    Raises LayoutError when they do not fit. Qwen2-VL horizontal: cols [1,3), [5,7), [9,11), rows [5,7).
    """
    check_choice("orientation", orientation, ORIENTATIONS)
    span, size = layout.span(n_items), layout.item_tokens
    along, across = (grid.cols, grid.rows) if orientation == "horizontal" else (grid.rows, grid.cols)
    axis_name, cross_name = ("columns", "rows") if orientation == "horizontal" else ("rows", "columns")
    if span > along:
        raise LayoutError(f"{n_items} items of {size} tokens with {layout.gap_tokens}-token gaps span {span} "
                          f"tokens, more than the grid's {along} {axis_name}")
    if size > across:
        raise LayoutError(f"items of {size} tokens do not fit the grid's {across} {cross_name}")
    start, cross = (along - span) // 2, (across - size) // 2
    d_row, d_col = offset or (0, 0)
    boxes = []
    for i in range(n_items):
        lo = start + i * (size + layout.gap_tokens)
        if orientation == "horizontal":
            box = (cross + d_row, lo + d_col, cross + size + d_row, lo + size + d_col)
        else:
            box = (lo + d_row, cross + d_col, lo + size + d_row, cross + size + d_col)
        _check_inside(grid, box, f"item {i} shifted by offset {(d_row, d_col)} to")
        boxes.append(box)
    return boxes


def line_offsets(grid: Grid, layout: Layout, orientation: str, n_items: int = 3) -> list[tuple[int, int]]:
    """Every (d_row, d_col) shift of the centred line of items for which the items and their strips still fit
    the grid, (0, 0) included. Qwen2-VL horizontal: d_row in [-5, 5], d_col in [-1, 1]."""
    shifts = []
    for d_row in range(-grid.rows, grid.rows + 1):
        for d_col in range(-grid.cols, grid.cols + 1):
            try:
                for box in line_boxes(grid, layout, orientation, n_items, offset=(d_row, d_col)):
                    strip_box(grid, layout, box, orientation)
            except LayoutError:
                continue
            shifts.append((d_row, d_col))
    return shifts


def strip_box(grid: Grid, layout: Layout, item_box: TokenBox, orientation: str) -> TokenBox:
    """The strip of an item: a full-height column band (horizontal) or full-width row band (vertical) of
    `strip_tokens` tokens centred on the item (the odd leftover token goes right / below).

    Qwen2-VL horizontal items [1,3), [5,7), [9,11) give strips cols [0,4), [4,8), [8,12). Raises LayoutError
    when the band leaves the grid.
    """
    check_choice("orientation", orientation, ORIENTATIONS)
    row0, col0, row1, col1 = item_box
    if orientation == "horizontal":
        lo = col0 - (layout.strip_tokens - (col1 - col0)) // 2
        box = (0, lo, grid.rows, lo + layout.strip_tokens)
    else:
        lo = row0 - (layout.strip_tokens - (row1 - row0)) // 2
        box = (lo, 0, lo + layout.strip_tokens, grid.cols)
    _check_inside(grid, box, f"the {layout.strip_tokens}-token strip of item {list(item_box)} covers")
    return box


def grid_boxes(grid: Grid, layout: Layout, n: int) -> list[list[TokenBox]]:
    """Token boxes of an n x n arrangement of items (`boxes[row][col]`), same item size and gap, centred."""
    span, size = layout.span(n), layout.item_tokens
    if span > grid.rows or span > grid.cols:
        raise LayoutError(f"a {n} x {n} arrangement of {size}-token items with {layout.gap_tokens}-token gaps "
                          f"spans {span} tokens, more than the {grid.rows} x {grid.cols} token grid")
    top, left = (grid.rows - span) // 2, (grid.cols - span) // 2
    step = size + layout.gap_tokens
    return [[(top + r * step, left + c * step, top + r * step + size, left + c * step + size)
             for c in range(n)] for r in range(n)]


def pixel_box(grid: Grid, token_box: TokenBox) -> PixelBox:
    """(x0, y0, x1, y1) pixels, exclusive, covered by `token_box`."""
    _check_inside(grid, token_box, "token box")
    row0, col0, row1, col1 = token_box
    p = grid.pixels_per_token
    return (col0 * p, row0 * p, col1 * p, row1 * p)


def token_indices(grid: Grid, token_box: TokenBox) -> list[int]:
    """Row-major visual token indices k = row * cols + col inside `token_box`, ascending."""
    _check_inside(grid, token_box, "token box")
    row0, col0, row1, col1 = token_box
    return [r * grid.cols + c for r in range(row0, row1) for c in range(col0, col1)]


def box_contains(outer: TokenBox, inner: TokenBox) -> bool:
    """Whether token (or pixel) box `inner` lies inside `outer`."""
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]
