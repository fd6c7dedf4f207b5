"""A setting (Squares, Shapes, Objects) from its config: its items, the answers the model may give, and
its prompt (SPEC section 1)."""

from dataclasses import dataclass

from omegaconf import DictConfig

from vlm.cli import UsageError

PREPOSITIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
DIRECTIONS = tuple(PREPOSITIONS)
# the directions each orientation can be queried with, and the position (0-2) each one asks for
DIRECTIONS_OF = {"horizontal": ("left", "right"), "vertical": ("above", "below")}
TARGET_POSITION = {"left": 0, "above": 0, "right": 2, "below": 2}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ItemSpec:
    """One item a setting can draw: `name` (e.g. "green circle"), `answer` (the word the prompt and the
    model use for it: the color, or the object name), and how to draw it (shape + rgb, or a glyph)."""

    name: str
    answer: str
    shape: str | None = None
    rgb: tuple[int, int, int] | None = None
    glyph: int | None = None


@dataclass(frozen=True)
class Setting:
    name: str
    prompt_template: str
    items: tuple[ItemSpec, ...]
    background: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Setting":
        try:
            items = tuple(ItemSpec(name=str(i.name), answer=str(i.answer), shape=i.get("shape"),
                                   rgb=tuple(i.rgb) if i.get("rgb") is not None else None, glyph=i.get("glyph"))
                          for i in cfg["items"])
            setting = cls(str(cfg.name), str(cfg.prompt), items, tuple(cfg.get("background", (255, 255, 255))))
        except (KeyError, AttributeError, TypeError) as err:
            raise UsageError(f"setting config {cfg.get('name', '?')!r} is malformed: {err}") from err
        if len({i.name for i in items}) != len(items):
            raise UsageError(f"setting {setting.name!r} has repeated item names")
        if "{prep}" not in setting.prompt_template or "{middle}" not in setting.prompt_template:
            raise UsageError(f"setting {setting.name!r}: the prompt needs {{prep}} and {{middle}}")
        return setting

    @property
    def candidates(self) -> list[str]:
        """The distinct answer words, in config order: what the scorer chooses from."""
        return list(dict.fromkeys(item.answer for item in self.items))

    def item(self, name: str) -> ItemSpec:
        for item in self.items:
            if item.name == name:
                return item
        raise UsageError(f"setting {self.name!r} has no item {name!r}; allowed: {', '.join(i.name for i in self.items)}")

    def prompt(self, direction: str, middle: ItemSpec) -> str:
        """The user turn asking for the item on `direction` of the reference `middle`."""
        return self.prompt_template.format(prep=PREPOSITIONS[direction], middle=middle.answer)
