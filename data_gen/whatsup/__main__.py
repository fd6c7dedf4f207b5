"""`python -m data_gen.whatsup {stand_in,boxes} [key=value ...]`: Hydra overrides of configs/whatsup_data.yaml.

    python -m data_gen.whatsup stand_in data.whatsup_dir=DIR     # stand-in photographs and their known boxes
    python -m data_gen.whatsup boxes data.whatsup_dir=DIR        # object boxes from the detector -> DIR/boxes.json
"""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from common.cli import CONFIG_DIR, command
from common.errors import UsageError, check_choice
from data_gen.whatsup import BOXES_FILE, STAND_IN_COMBOS, write_stand_in
from data_gen.whatsup.detect import detect_boxes
from data_gen.whatsup.stand_in import COMBOS, CONTROLLED_A_COMBOS, STAND_IN_COLORS, setting_colors

COMMANDS = ("stand_in", "boxes")
USAGE = ("usage: python -m data_gen.whatsup {stand_in,boxes} [key=value ...]  (Hydra overrides of "
         "configs/whatsup_data.yaml; see data_gen/whatsup/__main__.py)")


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/whatsup_data.yaml with Hydra `overrides`, as the other commands compose theirs."""
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="whatsup_data", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"bad override in {' '.join(overrides)}: {first}") from err


def stand_in(cfg: DictConfig) -> Path:
    """The `stand_in` command: write the stand-in directory data.whatsup_dir (must not exist yet)."""
    if cfg.data.whatsup_dir in (None, ""):
        raise UsageError("stand_in needs the directory to create: data.whatsup_dir=DIR")
    out = Path(str(cfg.data.whatsup_dir)).expanduser()
    if out.exists():
        raise UsageError(f"{out} already exists; give a new directory")
    check_choice("stand_in.combos", cfg.stand_in.combos, COMBOS)
    if cfg.stand_in.combos == "controlled_a":
        combos, colors = CONTROLLED_A_COMBOS, setting_colors(cfg.setting["items"])
    else:
        combos, colors = STAND_IN_COMBOS, STAND_IN_COLORS
    write_stand_in(out, combos, seed=int(cfg.seed), colors=colors)
    n = len(combos)
    print(f"stand-in What'sUp: {4 * n} photos of {n} object-reference combinations and their known boxes "
          f"(stand-in ground truth) -> {out} (use data.whatsup_dir={out} data.whatsup_boxes={out / BOXES_FILE})")
    return out


@command
def main(args: list[str]) -> int:
    if not args or args[0] not in COMMANDS:
        print(USAGE if not args or args[0] in ("-h", "--help") else f"error: unknown command {args[0]!r}; "
              f"allowed: {', '.join(COMMANDS)}\n{USAGE}", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    name, overrides = args[0], args[1:]
    if name == "stand_in" and len(overrides) >= 1 and "=" not in overrides[0]:
        overrides[0] = f"data.whatsup_dir={overrides[0]}"        # `stand_in DIR`, the older form
    cfg = compose_config(overrides)
    stand_in(cfg) if name == "stand_in" else detect_boxes(cfg)
    return 0


if __name__ == "__main__":
    main()
