"""The one way a command starts: Hydra composes `configs/`, and bad input becomes a one-line error.

Before Hydra runs, the command line's config-group choices (`experiment=`, `model=`, `setting=`, `sweep=`,
`hydra/launcher=`) are checked against what exists, so a typo gets one line naming what is allowed instead of
Hydra's multi-line report. In a multirun that sweeps keys other than model and setting (say `layers=[0],[1]`),
those keys are handed to every job as `variant_keys`, so each job writes its own results unit (common.results)
and no two jobs of a sweep write the same directory.
"""

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from common.errors import UsageError

REPO_DIR = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(REPO_DIR / "configs")
# `${repo:organisms/organism}` in a config: a path inside this repository, wherever the command runs from
OmegaConf.register_new_resolver("repo", lambda relative: str(REPO_DIR / relative), replace=True)


def gpu_count() -> int:
    """Visible NVIDIA GPUs (CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`), at least 1: the parallel
    jobs of configs/hydra/launcher/gpus.yaml."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip()]))
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(line.startswith("GPU ") for line in listed.splitlines()))


OmegaConf.register_new_resolver("gpu_count", gpu_count, replace=True)

GROUPS = ("experiment", "model", "setting", "sweep", "hydra/launcher")
# keys that name a results unit by themselves (results/<experiment>/<model>/<setting>/): sweeping them needs
# no variant directory
UNIT_KEYS = ("experiment", "model", "setting", "sweep")
# launchers that come with Hydra and its launcher plugins, usable as hydra/launcher=<name> when installed
PLUGIN_LAUNCHERS = {"basic": None, "joblib": "hydra_plugins.hydra_joblib_launcher",
                    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
                    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher"}
SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "tag(", "shuffle(", "sort(")


def group_choices(group: str, config_dir: str = CONFIG_DIR) -> list[str]:
    """The options of a config group: its YAML files, and for hydra/launcher the installed plugins' launchers."""
    names = sorted(path.stem for path in (Path(config_dir) / group).glob("*.yaml"))
    if group == "hydra/launcher":
        names += [name for name, module in PLUGIN_LAUNCHERS.items()
                  if module is None or importlib.util.find_spec(module) is not None]
    return names


def split_override(arg: str) -> tuple[str, str] | None:
    """(key, value) of a `key=value` / `+key=value` / `++key=value` override; None for anything else."""
    if arg.startswith("-") or "=" not in arg:
        return None
    key, _, value = arg.lstrip("+").partition("=")
    return key, value


def sweep_values(value: str) -> list[str] | None:
    """The values of a swept override (`a,b`; None when `value` is not a sweep, or a sweep function)."""
    if value.startswith(SWEEP_FUNCTIONS):
        return []
    depth, parts, current = 0, [], ""
    for char in value:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current] if parts else None


def check_group_choices(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """UsageError for a command-line group choice that does not exist (each value of a sweep is checked)."""
    for arg in argv:
        parsed = split_override(arg)
        if parsed is None or parsed[0] not in GROUPS:
            continue
        key, value = parsed
        values = sweep_values(value)
        allowed = group_choices(key, config_dir)
        for choice in (values if values is not None else [value]):
            if choice not in ("null", "") and choice not in allowed:
                raise UsageError(f"unknown {key.replace('hydra/', '')} {choice!r}; allowed: {', '.join(allowed)}")


def swept_keys(argv: list[str], config_dir: str = CONFIG_DIR) -> list[str]:
    """The keys a multirun sweeps other than the unit's own (experiment, model, setting): those swept on the
    command line, and those in the chosen sweep config's `hydra.sweeper.params`."""
    keys = []
    for arg in argv:
        parsed = split_override(arg)
        if parsed is None:
            continue
        key, value = parsed
        if key == "sweep" and value not in ("", "null"):
            sweep = OmegaConf.load(Path(config_dir) / "sweep" / f"{value}.yaml")
            keys += list(OmegaConf.select(sweep, "hydra.sweeper.params", default=None) or {})
        elif sweep_values(value) is not None:
            keys.append(key)
    return [k for k in dict.fromkeys(keys) if k not in UNIT_KEYS and not k.startswith("hydra")]


def is_multirun(argv: list[str]) -> bool:
    return any(arg in ("-m", "--multirun") for arg in argv) or any(
        (parsed := split_override(arg)) is not None and parsed[0] == "sweep" and parsed[1] not in ("", "null")
        for arg in argv)


def entrypoint(config_name: str = "config"):
    """Decorate `fn(cfg)` into a command over `configs/<config_name>.yaml` (Hydra).

    A `UsageError` raised inside (or by the group-choice check before Hydra starts) prints `error: <message>`
    on stderr and exits with code 2, before any result is written (results are only ever written whole, see
    common.results).
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
            argv = sys.argv[1:]
            try:
                check_group_choices(argv)
                variant = swept_keys(argv) if is_multirun(argv) else []
            except UsageError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            if variant:
                sys.argv.append(f"variant_keys=[{','.join(variant)}]")
            return hydra_main()

        return main

    return wrap


_NAME = re.compile(r"[^A-Za-z0-9._=,\[\]-]+")


def variant_name(cfg: DictConfig) -> str | None:
    """The results sub-directory of a job that sweeps other keys than the unit's: `key=value` for each of
    `cfg.variant_keys`, joined by `,` (None when there are none)."""
    keys = list(cfg.get("variant_keys") or [])
    if not keys:
        return None
    parts = []
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        text = str(value).replace(" ", "").replace("'", "")
        parts.append(f"{key}={text}")
    return _NAME.sub("_", ",".join(parts))
