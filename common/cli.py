"""The one way a command starts, and the one way bad input ends it: `error: <one line>` on stderr, exit code 2.

- `entrypoint(config_name)` makes a Hydra command of `fn(cfg)` (python -m runner, organisms.train, data_gen.render).
  Before Hydra starts, the command line is checked: override syntax, config-group choices (`experiment=`,
  `model=`, `setting=`, `sweep=`, `hydra/launcher=`) against what exists, and every key against the composed
  config, `+key=value` included (`check_keys`: an unknown key gets the closest known one). A multirun runs every
  job even when one refuses its input (a UsageError) or crashes, and ends with a summary: done, skipped, refused
  (with each one-line reason), failed. Exit code: 0; 2 when a job was refused (or the command line was); 1
  when a job failed.
- `command(fn)` does the same for a command that parses its own arguments (runner.paper, data_gen.whatsup).
- `plot_main(draw, ...)`: the argument parser every figure's plot.py shares (--results, --out).

Every `main` these return takes `argv` (a list: run in-process, returns the exit code) or nothing (the command
line: sys.argv, and the process exits with the code). Progress bars draw only on a terminal (`quiet_output`).

In a multirun that sweeps keys other than model and setting (say `layers=[0],[1]`), those keys are handed to
every job as `variant_keys`, so each job writes its own results unit (common.results).
"""

import argparse
import difflib
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable
from functools import partialmethod
from itertools import product
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
# files of a config group that are not options of it: configs/sweep/paper.yaml lists the sweeps of the paper
NOT_OPTIONS = {"sweep": ("paper",)}
# keys that name a results unit by themselves (results/<experiment>/<model>/<setting>/): sweeping them needs
# no variant directory
UNIT_KEYS = ("experiment", "model", "setting", "sweep")
# where `+key=value` may add keys: the model's architecture is handed to transformers' config as it is; a
# training phase may set any `train` key (organisms.train.phases refuses the others, before anything loads)
OPEN_KEYS = ("model.architecture.", "phases.")
# launchers that come with Hydra and its launcher plugins, usable as hydra/launcher=<name> when installed
PLUGIN_LAUNCHERS = {"basic": None, "joblib": "hydra_plugins.hydra_joblib_launcher",
                    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
                    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher"}
SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "tag(", "shuffle(", "sort(")


def usage_line(err: Exception) -> str:
    """The first line of an error's message (Hydra's and OmegaConf's run over several)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def quiet_output() -> None:
    """Progress bars only on a terminal: tqdm's default becomes disable=None (off when stderr is not a tty, so a
    log gets no bars and no escape codes), and transformers' own bars (its "Loading weights") are off: the runner
    prints one line per model load instead."""
    import tqdm.std

    if not getattr(tqdm.std.tqdm, "_quiet_default", False):
        tqdm.std.tqdm.__init__ = partialmethod(tqdm.std.tqdm.__init__, disable=None)
        tqdm.std.tqdm._quiet_default = True
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# --- the command line, before Hydra ----------------------------------------------------------------------

def group_choices(group: str, config_dir: str = CONFIG_DIR) -> list[str]:
    """The options of a config group: its YAML files, and for hydra/launcher the installed plugins' launchers."""
    names = sorted(path.stem for path in (Path(config_dir) / group).glob("*.yaml")
                   if path.stem not in NOT_OPTIONS.get(group, ()))
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


def parse_overrides(argv: list[str]) -> list:
    """Hydra's parse of the command line's overrides; UsageError naming a malformed one."""
    parser = OverridesParser.create()
    parsed = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parsed += parser.parse_overrides([arg])
        except HydraException as err:
            raise UsageError(f"cannot read the override {arg!r}: {usage_line(err)}") from err
    return parsed


def _is_group(key: str, config_dir: str) -> bool:
    return "/" in key or (Path(config_dir) / key).is_dir()


def compose_config(config_name: str, overrides: list[str], hydra_node: bool = False,
                   config_dir: str = CONFIG_DIR) -> DictConfig:
    """`configs/<config_name>.yaml` with `overrides`, as the command line composes it; UsageError (one line) for
    anything Hydra refuses."""
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_node)
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(f"bad override in {' '.join(overrides) or 'the defaults'}: {usage_line(err)}") from err


_ABSENT = object()


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if OmegaConf.is_dict(node):
        for key in node.keys():
            keys.append(f"{prefix}{key}")
            try:
                keys += _dotted_keys(node._get_node(key), f"{prefix}{key}.")
            except OmegaConfBaseException:
                continue
    return keys


def unknown_key(key: str, schema: DictConfig, where: str, own: list[str]) -> str:
    """One line for a key the config does not have, with the closest known key (difflib: a sibling's name first,
    then any key's last part, then any whole key) or else the owner's own keys."""
    hydra_key = key.startswith("hydra.")
    known = [k for k in _dotted_keys(schema) if k.startswith("hydra.") == hydra_key]
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    leaves = {k.rpartition(".")[2]: k for k in known}
    close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)] or \
        [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)] or \
        difflib.get_close_matches(key, known, n=1, cutoff=0.85)
    if hydra_key:
        where, own = "Hydra's config for this command", []
    hint = f"did you mean {close[0]}?" if close else f"its own keys: {', '.join(own)}" if own else \
        "see its configs"
    return f"unknown key {key!r}: {where} has no such key; {hint}"


def _own_keys(config_name: str, experiment: str | None, config_dir: str) -> list[str]:
    path = Path(config_dir) / (f"experiment/{experiment}.yaml" if experiment else f"{config_name}.yaml")
    if not path.is_file():
        return []
    return [k for k in OmegaConf.load(path) if k not in ("defaults", "experiment", "hydra")]


def check_keys(argv: list[str], config_name: str = "config", config_dir: str = CONFIG_DIR) -> None:
    """UsageError for a command-line key the composed config does not have, `+key` and `++key` included (only
    under OPEN_KEYS may a key be added), or a `+key` that is already there. The config is composed from the
    command line's group choices (one composition per experiment a multirun sweeps)."""
    overrides = parse_overrides(argv)
    groups = [o for o in overrides if _is_group(o.key_or_group, config_dir) and not o.is_delete()]
    keys = [o for o in overrides if not _is_group(o.key_or_group, config_dir) and not o.is_delete()]
    if not keys:
        return
    choices = []
    for o in groups:
        values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [o.get_value_element_as_str()]
        if o.key_or_group in ("model", "setting"):
            values = values[:1]                     # the keys they bring differ only under model.* / setting.*
        choices.append([f"{o.get_key_element()}={value}" for value in values])
    for combination in list(product(*choices))[:16]:
        schema = compose_config(config_name, list(combination), hydra_node=True, config_dir=config_dir)
        experiment = OmegaConf.select(schema, "experiment.name", default=None) if config_name == "config" else None
        where = f"experiment {experiment}" if experiment else f"configs/{config_name}.yaml"
        for o in keys:
            key = o.key_or_group
            try:
                found = OmegaConf.select(schema, key, default=_ABSENT, throw_on_missing=False)
            except OmegaConfBaseException:
                found = _ABSENT
            if found is not _ABSENT and o.is_add():
                raise UsageError(f"+{key}: {key} is already a key of {where}; set it without +: "
                                 f"{key}={o.get_value_element_as_str()}")
            if found is _ABSENT and not key.startswith(OPEN_KEYS):
                raise UsageError(unknown_key(key, schema, where, _own_keys(config_name, experiment, config_dir)))


def check_command_line(argv: list[str], config_name: str = "config", config_dir: str = CONFIG_DIR) -> bool:
    """Every check of a Hydra command line before Hydra starts (module docstring); returns whether it is a
    multirun."""
    parse_overrides(argv)
    check_group_choices(argv, config_dir)
    multirun = is_multirun(argv)
    if not multirun:
        for arg in argv:
            parsed = split_override(arg)
            if parsed is not None and sweep_values(parsed[1]) is not None:
                raise UsageError(f"{arg} sweeps several values: run it as a multirun (-m)")
    check_keys(argv, config_name, config_dir)
    return multirun


# --- jobs and their outcomes -----------------------------------------------------------------------------

_OUTCOMES: list[dict] = []          # this process's jobs (a single run reads its outcome here)
_SUMMARY: dict = {}                 # the last multirun's summary (MultirunSummary)
STATUSES = ("done", "skipped", "refused", "failed")


def _run_job(fn: Callable, cfg: DictConfig) -> dict:
    """Run one job; its outcome is {"status": done | skipped (what fn returned) | refused (a UsageError, its
    line printed) | failed (any other exception, its traceback printed), "reason", "overrides"}."""
    try:
        result = fn(cfg)
        outcome = {"status": result if result in STATUSES else "done", "reason": ""}
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        outcome = {"status": "refused", "reason": str(err)}
    except Exception as err:
        traceback.print_exc()
        outcome = {"status": "failed", "reason": usage_line(f"{type(err).__name__}: {err}")}
    outcome["overrides"] = []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        outcome["overrides"] = [o for o in hydra_cfg.overrides.task if not o.startswith("variant_keys=")]
        token = OmegaConf.select(hydra_cfg, "callbacks.outcomes.token", default=None)
        if hydra_cfg.mode == RunMode.MULTIRUN and token:
            out = Path(hydra_cfg.runtime.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"outcome-{token}.json").write_text(json.dumps({**outcome, "num": hydra_cfg.job.num}))
    _OUTCOMES.append(outcome)
    return outcome


def summary(outcomes: list[dict]) -> tuple[str, int]:
    """(the multirun's closing lines, its exit code): counts per status, then one line per refused or failed
    job named by the overrides that set it apart from the others. Exit code 1 if a job failed, else 2 if one
    was refused, else 0."""
    counts = {status: sum(o["status"] == status for o in outcomes) for status in STATUSES}
    shared = set.intersection(*(set(o["overrides"]) for o in outcomes)) if outcomes else set()
    lines = [f"multirun: {len(outcomes)} jobs: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)]
    for k, o in enumerate(outcomes):
        if o["status"] in ("refused", "failed"):
            name = " ".join(x for x in o["overrides"] if x not in shared) or f"job {o.get('num', k)}"
            lines.append(f"  {o['status']}: {name}: {o['reason']}")
    code = 1 if counts["failed"] else 2 if counts["refused"] else 0
    return "\n".join(lines), code


class MultirunSummary(Callback):
    """Hydra callback, added to every multirun by `entrypoint`: at the end, reads each job's outcome (written
    into its Hydra job directory, so jobs in other processes or on other machines count too) and prints the
    summary."""

    def __init__(self, token: str) -> None:
        self.token = token

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        found = [json.loads(p.read_text()) for p in Path(config.hydra.sweep.dir).glob(f"*/outcome-{self.token}.json")]
        text, code = summary(sorted(found, key=lambda o: o["num"]))
        print(text, flush=True)
        _SUMMARY.update(text=text, code=code)


def _exit_code(value) -> int:
    return 0 if value is None else value if isinstance(value, int) else 1


def named_config(args: list[str], default: str) -> str:
    """The config a command line composes: Hydra's `--config-name NAME` (`--config-name=NAME`, `-cn NAME`), else
    the command's own."""
    for k, arg in enumerate(args):
        for flag in ("--config-name", "-cn"):
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
            if arg == flag and k + 1 < len(args):
                return args[k + 1]
    return default


def entrypoint(config_name: str = "config"):
    """Decorate `fn(cfg) -> "done" | "skipped" | None` into `main(argv=None) -> int`, a command over
    `configs/<config_name>.yaml` (Hydra; module docstring for what it checks and returns)."""

    def wrap(fn):
        @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
        def hydra_main(cfg: DictConfig):
            return _run_job(fn, cfg)

        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            args = list(sys.argv[1:] if argv is None else argv)
            quiet_output()
            try:
                multirun = check_command_line(args, named_config(args, config_name))
                variant = swept_keys(args) if multirun else []
            except UsageError as err:
                print(f"error: {err}", file=sys.stderr)
                return _finish(2, argv)
            extra = [f"variant_keys=[{','.join(variant)}]"] if variant else []
            token = uuid.uuid4().hex[:12]
            if multirun:
                extra += [f"+hydra.callbacks.outcomes._target_={__name__}.MultirunSummary",
                          f"+hydra.callbacks.outcomes.token={token}"]
            _OUTCOMES.clear()
            _SUMMARY.clear()
            saved = sys.argv
            overrides = [a for a in args if "=" in a and not a.startswith("-")]
            flags = [a for a in args if a not in overrides]      # Hydra's parser wants its flags first
            sys.argv = [saved[0] if saved else "main", *flags, *overrides, *extra]
            try:
                hydra_main()
            except SystemExit as done:          # Hydra ends with one: --help (0), an error it reports itself (1)
                code = _exit_code(done.code)
                return _finish(2 if code == 1 else code, argv)   # our jobs never raise: a Hydra error is the input's
            finally:
                sys.argv = saved
            if multirun:
                code = _SUMMARY.get("code", 0)
            else:
                status = _OUTCOMES[-1]["status"] if _OUTCOMES else "done"
                code = {"refused": 2, "failed": 1}.get(status, 0)
            return _finish(code, argv)

        main.job = fn
        return main

    return wrap


def _finish(code: int, argv) -> int:
    """The command line (argv None) exits with the code; an in-process call gets it back."""
    sys.stdout.flush()
    if argv is None:
        sys.exit(code)
    return code


def command(fn: Callable[[list[str]], int | None]) -> Callable[..., int]:
    """Decorate `fn(args) -> exit code | None` (a command that reads its own arguments) into `main(argv=None)`:
    a UsageError prints its one line and gives exit code 2."""

    @functools.wraps(fn)
    def main(argv: list[str] | None = None) -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        quiet_output()
        try:
            code = _exit_code(fn(args))
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            code = 2
        return _finish(code, argv)

    return main


def plot_main(draw: Callable[[Path, Path], int | None], doc: str, file: str, argv: list[str] | None = None) -> int:
    """The command line of every figure's plot.py: `--results DIR` (default results), `--out DIR` (default
    figures/<figure>/out), then `draw(results, out)`; a UsageError (e.g. no results yet) is one line, exit 2."""
    figure_dir = Path(file).resolve().parent

    @command
    def run(args: list[str]) -> int | None:
        parser = argparse.ArgumentParser(prog=f"figures/{figure_dir.name}/plot.py", description=doc)
        parser.add_argument("--results", type=Path, default=Path("results"))
        parser.add_argument("--out", type=Path, default=figure_dir / "out")
        parsed = parser.parse_args(args)
        return draw(parsed.results, parsed.out)

    return run(argv)


def no_results(experiment: str, results: Path, figure: str) -> UsageError:
    """The error of a plot that finds nothing to draw."""
    return UsageError(f"no {experiment} results under {Path(results) / experiment}; run scripts/{figure}.sh first")


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
