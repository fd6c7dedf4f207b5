"""The samples of a setting: the one place an experiment asks for its images, so no experiment branches on
where a setting's images come from.

A synthetic setting (squares, shapes, objects) draws `cfg.n` random queried images with `cfg.seed`
(data_gen.render.random_samples). A What'sUp setting (`source: whatsup` in its config) reads the composites
of `cfg.data.whatsup_dir` (data_gen.whatsup), takes one split of them (`all`, or a name in `setting.splits`)
and gives both queried directions of every composite; `cfg.n` does not apply, `setting.n_composites` sizes it.
"""

from dataclasses import replace

from omegaconf import DictConfig

from common.errors import UsageError, check_choice
from common.geometry import Grid, Layout
from data_gen.render import Sample, random_samples
from data_gen.settings import Setting
from data_gen.whatsup import composite_samples, load_composites, load_splits

SOURCES = ("synthetic", "whatsup")


def setting_source(cfg: DictConfig) -> str:
    """`synthetic` or `whatsup`, from the setting config's `source` (synthetic when absent)."""
    source = cfg.setting.get("source", "synthetic")
    check_choice(f"source of setting {cfg.setting.get('name')!r}", source, SOURCES)
    return source


def setting_samples(cfg: DictConfig, split: str = "all", queried: bool = True) -> list[Sample]:
    """The samples of `cfg.setting` on `cfg.model`'s grid.

    synthetic: `cfg.n` random queried samples (`split` must be all; `queried=False` is not offered: probes on
    synthetic settings draw their own arrangements, probing.extract). whatsup: the composites of `split`;
    queried, two samples per composite (left, right) sharing one image; not queried, one sample per
    composite with no direction, prompt or answer (for probes)."""
    setting = Setting.from_config(cfg.setting)
    if setting_source(cfg) == "synthetic":
        if split != "all" or not queried:
            raise UsageError(f"setting {setting.name!r} is synthetic: it has no splits of fixed images")
        return random_samples(setting, Grid.from_config(cfg.model.grid), Layout.from_config(cfg.model.layout),
                              cfg.n, cfg.seed)
    if split == "all":
        composites = load_composites(cfg)
    else:
        splits = load_splits(cfg)
        check_choice("What'sUp split", split, ["all", *splits])
        composites = splits[split]
    if queried:
        return [sample for composite in composites for sample in composite_samples(composite, setting)]
    return [replace(composite_samples(composite, setting, ("left",))[0], id=f"{setting.name}_{composite.id}",
                    direction=None, prompt=None, answer=None) for composite in composites]
