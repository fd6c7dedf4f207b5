"""The one runner: `python -m runner experiment=<name> model=<name> setting=<name> [key=value ...]`.

Every experiment is a config, `configs/experiment/<name>.yaml`, whose `experiment` block names the function that
runs it (`run`, a dotted path: `(cfg, get_vlm) -> (metrics, arrays)`), the figure it feeds (`figure`) and the
kinds of setting it runs on (`sources`). The runner does the rest the same way for all of them: refuse a
setting the experiment cannot handle, skip a unit whose results exist (unless redo=true), load the model only
when the experiment asks for it, and save the unit whole (common.results).

    python -m runner experiment=strip_patching model=organism setting=squares n_pairs=4
    python -m runner -m experiment=last_token model=organism setting=squares,shapes n_pairs=2   # multirun
    python -m runner sweep=fig02_last_token                  # a figure's whole grid (configs/sweep/)
    python -m runner sweep=fig02_last_token hydra/launcher=slurm      # the same grid as SLURM jobs
"""

from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from common.cli import CONFIG_DIR, entrypoint
from common.errors import UsageError, check_choice
from common.results import is_done, save_unit, setting_rank, unit_dir
from data_gen.samples import SOURCES, setting_source
from vlm.models import model_loader


def experiment_function(cfg: DictConfig) -> Callable:
    """The function `cfg.experiment.run` names; UsageError when it does not exist."""
    path = cfg.experiment.get("run")
    try:
        return get_method(str(path))
    except Exception as err:
        raise UsageError(f"experiment {cfg.experiment.name!r} names run={path!r}, which is not a function "
                         f"(configs/experiment/{cfg.experiment.name}.yaml)") from err


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


def run_unit(cfg: DictConfig, get_vlm: Callable | None = None) -> Path:
    """Run `cfg`'s experiment on its model and setting and save the unit; skip a finished one unless
    cfg.redo. Returns the unit's directory. `get_vlm` loads the model (default: `cfg`'s, on first use); a caller
    running many units of one model passes one that loads it once."""
    run = experiment_function(cfg)
    check_setting(cfg)
    out = unit_dir(cfg)
    if is_done(out) and not cfg.redo:
        print(f"{cfg.experiment.name}: {out} exists, skipping (redo=true to recompute)")
        return out
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    metrics, arrays = run(cfg, get_vlm or model_loader(cfg))
    save_unit(out, metrics, arrays, cfg)
    print(f"{cfg.experiment.name} {cfg.model.name} {cfg.setting.name} -> {out}")
    return out


@entrypoint()
def main(cfg: DictConfig) -> None:
    run_unit(cfg)
