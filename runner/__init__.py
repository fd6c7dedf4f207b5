"""The one runner: `python -m runner experiment=<name> model=<name> setting=<name> [key=value ...]`.

Every experiment is a config, `configs/experiment/<name>.yaml`, whose `experiment` block names the function that
runs it (`run`, a dotted path: `(cfg, get_vlm) -> (metrics, arrays)`), the figure it feeds (`figure`, whose
plot runner.paper draws) and the kinds of setting it runs on (`sources`). The function's module may export
`check(cfg)` (its own input checks), `passes(cfg)` (what `runner.paper --dry-run` counts) and
`summary(metrics)` (the unit's main number in one line). The runner does the rest the same way for all of them:

1. check everything before any model loads (`prepare`): the setting's kind, every shared size and type
   (common.checks, layers against the depth in the model config), the experiment's own `check(cfg)`, the
   What'sUp data when the setting reads it, the model's path, the device, that the results can be written;
2. find the unit's state (common.results.unit_state): a finished unit with the same identity is skipped; one
   with another identity is refused in one line naming the differing keys (redo=true overwrites it); a corrupt
   or partial one is recomputed;
3. load the model only when the experiment asks for it (once), run, save the unit whole, and print one line:
   the unit's main number, its time and where it went.

    python -m runner experiment=strip_patching model=organism setting=squares n_pairs=4
    python -m runner -m experiment=last_token model=organism setting=squares,shapes n_pairs=2   # multirun
    python -m runner sweep=fig02_last_token                  # a figure's whole grid (configs/sweep/)
    python -m runner sweep=fig02_last_token hydra/launcher=slurm      # the same grid as SLURM jobs
"""

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from common.checks import check_values, check_writable, model_depth
from common.cli import CONFIG_DIR, entrypoint
from common.errors import UsageError, check_choice
from common.results import measures_nothing, save_unit, setting_rank, unit_dir, unit_state
from data_gen.samples import SOURCES, setting_source
from data_gen.whatsup import SUBSETS, load_composites, whatsup_root
from vlm.adapters import ADAPTERS
from vlm.models import INITS, VLM, _checked_path, device_placement, load_model, resolve_device


def experiment_function(cfg: DictConfig) -> Callable:
    """The function `cfg.experiment.run` names; UsageError when it does not exist."""
    path = cfg.experiment.get("run")
    try:
        return get_method(str(path))
    except Exception as err:
        raise UsageError(f"experiment {cfg.experiment.name!r} names run={path!r}, which is not a function "
                         f"(configs/experiment/{cfg.experiment.name}.yaml)") from err


def experiment_module(cfg: DictConfig) -> ModuleType:
    """The module of the experiment's function: where its `check`, `passes` and `summary` live."""
    return sys.modules[experiment_function(cfg).__module__]


def settings_of(sources) -> list[str]:
    """The setting names (configs/setting/*.yaml) whose source is one of `sources`."""
    names = []
    for path in sorted((Path(CONFIG_DIR) / "setting").glob("*.yaml")):
        if OmegaConf.load(path).get("source", "synthetic") in sources:
            names.append(path.stem)
    return sorted(names, key=setting_rank)


def check_setting(cfg: DictConfig) -> None:
    """UsageError unless the experiment runs on the kind of setting chosen (its `sources`)."""
    sources = list(cfg.experiment.get("sources") or SOURCES)
    for source in sources:
        check_choice("setting source", source, SOURCES)
    if setting_source(cfg) not in sources:
        raise UsageError(f"experiment {cfg.experiment.name} does not run on setting {cfg.setting.name!r}; "
                         f"allowed: {', '.join(settings_of(sources))}")


def check_whatsup_data(cfg: DictConfig) -> None:
    """A What'sUp setting's data, read before any model loads: the annotation file must be a non-empty JSON list
    (an empty, malformed or `[]` file is refused in one line), and its photographs must make composites."""
    subset = str(cfg.setting.get("subset", "controlled_images"))
    annotation = whatsup_root(cfg.data.whatsup_dir, subset) / SUBSETS[subset]
    if annotation.is_file():
        try:
            entries = json.loads(annotation.read_text())
        except ValueError as err:
            raise UsageError(f"{annotation} is not JSON ({err}): expected What'sUp's list of "
                             f"{{image_path, caption_options}} entries") from err
        if not isinstance(entries, list) or not entries:
            raise UsageError(f"{annotation} holds no entries: expected What'sUp's list of "
                             f"{{image_path, caption_options}} entries")
    if not load_composites(cfg):
        raise UsageError(f"the photographs listed in {annotation} make no composite: none has a left_of and a "
                         f"right_of photograph of the same reference with two different objects")


def check_model(cfg: DictConfig) -> None:
    """The model's depth is in its config, its family and init exist, a checkpoint path exists and holds a
    config.json, the device exists and the placement (device_map, max_memory) is one the loader takes."""
    model_depth(cfg)
    check_choice("model family", cfg.model.family, ADAPTERS)
    check_choice("model.init", cfg.model.init, INITS)
    device = resolve_device(str(cfg.device))
    if cfg.model.init == "pretrained" and not cfg.model.get("twin"):
        _checked_path(str(cfg.model.path), cfg.model.get("made_by"))
        device_placement(cfg, ADAPTERS[cfg.model.family](cfg.model.modules), device)


@dataclass
class Prepared:
    """A unit checked and ready: its function, directory and state (common.results.unit_state)."""

    run: Callable
    module: ModuleType
    out: Path
    state: str
    detail: str


def prepare(cfg: DictConfig) -> Prepared:
    """Every check of the module docstring's step 1 and 2, before any model loads; UsageError on the first
    problem. Nothing is written."""
    run = experiment_function(cfg)
    module = sys.modules[run.__module__]
    check_setting(cfg)
    check_values(cfg)
    if hasattr(module, "check"):
        module.check(cfg)
    if setting_source(cfg) == "whatsup":
        check_whatsup_data(cfg)
    check_model(cfg)
    out = unit_dir(cfg)
    check_writable(out.parent, f"results_dir={cfg.results_dir}")
    state, detail = unit_state(out, cfg)
    if state == "different" and not cfg.redo:
        raise UsageError(f"{out} holds a finished unit with other values: {detail}; redo=true overwrites it "
                         f"(or give another results_dir)")
    return Prepared(run, module, out, state, detail)


def checked_loader(cfg: DictConfig, get_vlm: Callable[[], VLM] | None = None) -> Callable[[], VLM]:
    """`get_vlm` (default: load cfg's model) that loads once, prints one line when it does, and checks the
    loaded LM's depth against the config's (layers were checked against the config)."""
    loaded: list[VLM] = []

    def get() -> VLM:
        if not loaded:
            start = time.perf_counter()
            vlm = get_vlm() if get_vlm is not None else load_model(cfg)
            if get_vlm is None:
                print(f"loaded {vlm.name} ({time.perf_counter() - start:.1f} s)", flush=True)
            depth = model_depth(cfg)
            if vlm.n_layers != depth:
                raise UsageError(f"model {vlm.name} has {vlm.n_layers} LM layers, but model.architecture."
                                 f"text_config.num_hidden_layers says {depth}: make its config match the checkpoint")
            loaded.append(vlm)
        return loaded[0]

    return get


def unit_line(cfg: DictConfig, module: ModuleType, metrics: dict, seconds: float, out: Path) -> str:
    """The line a finished unit ends with: its main number (the module's `summary`), time and directory."""
    nothing = measures_nothing(metrics)
    text = nothing or (module.summary(metrics) if hasattr(module, "summary") else "done")
    return f"{cfg.experiment.name} {cfg.model.name} {cfg.setting.name}: {text} [{seconds:.1f} s] -> {out}"


def execute(cfg: DictConfig, get_vlm: Callable[[], VLM] | None = None) -> str:
    """Check, then run and save `cfg`'s unit or skip it: "done" or "skipped" (module docstring). `get_vlm` loads
    the model (default: `cfg`'s, on first use); a caller running many units of one model passes one that loads
    it once."""
    unit = prepare(cfg)
    if unit.state == "same" and not cfg.redo:
        print(f"{cfg.experiment.name} {cfg.model.name} {cfg.setting.name}: {unit.out} exists, skipping "
              f"(redo=true to recompute)", flush=True)
        return "skipped"
    if unit.state == "corrupt":
        print(f"{unit.out}: {unit.detail}: recomputing it", flush=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    start = time.perf_counter()
    metrics, arrays = unit.run(cfg, checked_loader(cfg, get_vlm))
    save_unit(unit.out, metrics, arrays, cfg)
    print(unit_line(cfg, unit.module, metrics, time.perf_counter() - start, unit.out), flush=True)
    return "done"


def run_unit(cfg: DictConfig, get_vlm: Callable[[], VLM] | None = None) -> Path:
    """`execute` for callers that want the unit's directory."""
    execute(cfg, get_vlm)
    return unit_dir(cfg)


@entrypoint()
def main(cfg: DictConfig) -> str:
    return execute(cfg)
