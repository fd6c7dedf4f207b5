"""A setting (squares, shapes, objects) from its config `configs/setting/<name>.yaml`: the items it draws,
the answers the model chooses from, and the prompt (docs/experiments.md, "Task and prompts"; paper appendix A.2 and A.3)."""

from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import UsageError, check_choice

# paper A.3: the preposition each queried direction is written with
PREPOSITIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
DIRECTIONS = tuple(PREPOSITIONS)
# the directions each orientation is queried with, and the position (0-2 along the axis) each one asks for
DIRECTIONS_OF = {"horizontal": ("left", "right"), "vertical": ("above", "below")}
TARGET_POSITION = {"left": 0, "above": 0, "right": 2, "below": 2}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}

SHAPES = ("square", "circle", "triangle", "star", "cross", "heart")
MIDDLE_FIELDS = ("answer", "name")


@dataclass(frozen=True)
class ItemSpec:
    """One item a setting can draw.

    `name` identifies it (e.g. "green circle"); `answer` is the word the model should answer for it (the
    color, or the object name). Drawn as `shape` filled with `rgb`, or as the OpenMoji glyph `glyph` (a code
    point); exactly one of the two.
    """

    name: str
    answer: str
    shape: str | None = None
    rgb: tuple[int, int, int] | None = None
    glyph: int | None = None


@dataclass(frozen=True)
class Setting:
    """A setting's items (in config order), its prompt template and its background color.

    `prompt_template` holds `{prep}` and `{middle}`; `middle_field` says which item field fills `{middle}`
    ("answer": the color or object word, as in the paper's templates; "name": e.g. "green circle").
    """

    name: str
    prompt_template: str
    items: tuple[ItemSpec, ...]
    background: tuple[int, int, int] = (255, 255, 255)
    middle_field: str = "answer"

    @classmethod
    def from_config(cls, cfg: Mapping) -> "Setting":
        """Build from the DictConfig `cfg.setting` (or a loaded setting YAML); UsageError when malformed."""
        name = cfg.get("name", "?") if isinstance(cfg, Mapping) else "?"
        try:
            items = tuple(_item_spec(name, raw) for raw in cfg["items"])
            setting = cls(name=str(cfg["name"]), prompt_template=str(cfg["prompt"]), items=items,
                          background=_rgb(cfg.get("background", (255, 255, 255))),
                          middle_field=str(cfg.get("middle", "answer")))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__   # OmegaConf adds lines
            if isinstance(err, KeyError) and not detail.lower().startswith("missing"):
                detail = f"missing key {detail}"
            raise UsageError(f"setting config {name!r} is malformed: {detail}") from err
        setting._check()
        return setting

    def _check(self) -> None:
        where = f"setting {self.name!r}"
        check_choice(f"{where} middle field", self.middle_field, MIDDLE_FIELDS)
        names = [item.name for item in self.items]
        if len(set(names)) != len(names):
            raise UsageError(f"{where} repeats an item name: {', '.join(names)}")
        if len(names) < 3:
            raise UsageError(f"{where} has {len(names)} items; an image needs 3 distinct ones")
        try:
            self.prompt_template.format(prep="", middle="")
        except (KeyError, IndexError, ValueError) as err:
            raise UsageError(f"{where}: prompt may only hold {{prep}} and {{middle}}, got "
                             f"{self.prompt_template!r}") from err
        if "{prep}" not in self.prompt_template or "{middle}" not in self.prompt_template:
            raise UsageError(f"{where}: prompt {self.prompt_template!r} needs both {{prep}} and {{middle}}")

    @property
    def candidates(self) -> list[str]:
        """The distinct answer words, in config order: what the scorer chooses from."""
        return list(dict.fromkeys(item.answer for item in self.items))

    @property
    def item_names(self) -> list[str]:
        return [item.name for item in self.items]

    def item(self, name: str) -> ItemSpec:
        """The item called `name`; UsageError naming the allowed names otherwise."""
        for item in self.items:
            if item.name == name:
                return item
        raise UsageError(f"setting {self.name!r} has no item {name!r}; allowed: {', '.join(self.item_names)}")

    def prompt(self, direction: str, middle: "ItemSpec | str") -> str:
        """The user turn asking for the item on `direction` (left/right/above/below) of the reference item
        `middle` (an ItemSpec or an item name)."""
        check_choice("direction", direction, DIRECTIONS)
        spec = self.item(middle) if isinstance(middle, str) else middle
        return self.prompt_template.format(prep=PREPOSITIONS[direction], middle=getattr(spec, self.middle_field))


def _rgb(value) -> tuple[int, int, int]:
    rgb = tuple(int(v) for v in value)
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"a color is three integers in [0, 255], got {list(value)}")
    return rgb


def _code_point(value) -> int:
    """A glyph code point from an int or "U+1F34A"."""
    if isinstance(value, str):
        text = value.strip().upper()
        if not text.startswith("U+"):
            raise ValueError(f"glyph {value!r} is not a code point like U+1F34A")
        return int(text[2:], 16)
    return int(value)


def _item_spec(setting_name: str, raw: Mapping) -> ItemSpec:
    name = str(raw["name"])
    shape, rgb, glyph = raw.get("shape"), raw.get("rgb"), raw.get("glyph")
    if (glyph is None) == (shape is None):
        raise ValueError(f"item {name!r} needs either shape (with rgb) or glyph")
    if glyph is not None:
        return ItemSpec(name, str(raw["answer"]), glyph=_code_point(glyph))
    if shape not in SHAPES:
        raise ValueError(f"item {name!r} has shape {shape!r}; allowed: {', '.join(SHAPES)}")
    if rgb is None:
        raise ValueError(f"item {name!r} has a shape but no rgb")
    return ItemSpec(name, str(raw["answer"]), shape=str(shape), rgb=_rgb(rgb))
