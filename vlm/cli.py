"""The one way a command starts: Hydra composes `configs/`, and bad input becomes a one-line error."""

import functools
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

REPO_DIR = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(REPO_DIR / "configs")
# `${repo:vlm/organism}` in a config: a path inside this repository, wherever the command runs from
OmegaConf.register_new_resolver("repo", lambda relative: str(REPO_DIR / relative), replace=True)


class UsageError(Exception):
    """Bad input from the user (a value that is not allowed, a missing path). Printed as one line, exit code 2."""


def entrypoint(config_name: str = "config", experiment: str | None = None):
    """Decorate `fn(cfg)` into a command over `configs/<config_name>.yaml` (Hydra).

    `experiment`, when given, is the command's default `experiment=` (the root config's is accuracy).
    A `UsageError` raised inside prints `error: <message>` on stderr and exits with code 2, before any
    result is written (results are only ever written whole, see vlm.results).
    """

    def wrap(fn):
        @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
        def hydra_main(cfg: DictConfig):
            try:
                return fn(cfg)
            except UsageError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)

        @functools.wraps(fn)
        def main():
            if experiment and not any(arg.lstrip("+").startswith("experiment=") for arg in sys.argv[1:]):
                sys.argv.append(f"experiment={experiment}")
            return hydra_main()

        return main

    return wrap


def check_choice(what: str, value, allowed) -> None:
    """Raise a UsageError naming `value` and the allowed values unless `value` is one of them."""
    allowed = list(allowed)
    if value not in allowed:
        raise UsageError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")
