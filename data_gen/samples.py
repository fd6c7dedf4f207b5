"""The samples and pairs of a setting: the one place an experiment asks for its images, so no experiment
branches on where a setting's images come from.

A synthetic setting (squares, shapes, objects) draws `cfg.n` random queried images with `cfg.seed`
(data_gen.render.random_samples). A What'sUp setting (`source: whatsup` in its config) reads the composites
of `cfg.data.whatsup_dir` (data_gen.whatsup: one set, drawn from the seed alone), takes one split of them (`all`,
or a name in `setting.splits`), keeps those with boxes when asked (`boxes=True`, for what trains on the tokens
inside boxes) and gives both queried directions of every composite; `cfg.n` does not apply,
`setting.n_composites` sizes it.
"""

from dataclasses import replace

from omegaconf import DictConfig

from common.errors import UsageError, check_choice
from common.geometry import Grid, Layout
from data_gen.pairs import LastTokenPair, MirrorPair, last_token_pairs, mirror_pairs
from data_gen.render import Sample, random_samples
from data_gen.settings import Setting
from data_gen.whatsup import (
    Composite,
    composite_samples,
    load_composites,
    load_splits,
    load_whatsup,
    whatsup_last_token_pairs,
    whatsup_mirror_pairs,
    with_boxes,
)

SOURCES = ("synthetic", "whatsup")


def setting_source(cfg: DictConfig) -> str:
    """`synthetic` or `whatsup`, from the setting config's `source` (synthetic when absent)."""
    source = cfg.setting.get("source", "synthetic")
    check_choice(f"source of setting {cfg.setting.get('name')!r}", source, SOURCES)
    return source


def whatsup_split(cfg: DictConfig, split: str = "all", boxes: bool = False) -> tuple[list[Composite], dict | None]:
    """The What'sUp composites of `split` (all, or a name in `setting.splits`), and with `boxes` only those whose
    items have boxes, with the record of what was dropped (data_gen.whatsup.with_boxes; None without `boxes`)."""
    if split == "all":
        composites = load_composites(cfg)
    else:
        splits = load_splits(cfg)
        check_choice("What'sUp split", split, ["all", *splits])
        composites = splits[split]
    return with_boxes(composites) if boxes else (composites, None)


def setting_samples(cfg: DictConfig, split: str = "all", queried: bool = True, boxes: bool = False) -> list[Sample]:
    """The samples of `cfg.setting` on `cfg.model`'s grid.

    synthetic: `cfg.n` random queried samples (`split` must be all; `queried=False` is not offered: probes on
    synthetic settings draw their own arrangements, probing.extract). whatsup: the composites of `split` (with
    `boxes`, only those whose items have boxes); queried, two samples per composite (left, right) sharing one
    image; not queried, one sample per composite with no direction, prompt or answer (for probes)."""
    setting = Setting.from_config(cfg.setting)
    if setting_source(cfg) == "synthetic":
        if split != "all" or not queried:
            raise UsageError(f"setting {setting.name!r} is synthetic: it has no splits of fixed images")
        return random_samples(setting, Grid.from_config(cfg.model.grid), Layout.from_config(cfg.model.layout),
                              cfg.n, cfg.seed)
    composites, _ = whatsup_split(cfg, split, boxes)
    if queried:
        return [sample for composite in composites for sample in composite_samples(composite, setting)]
    return [replace(composite_samples(composite, setting, ("left",))[0], id=f"{setting.name}_{composite.id}",
                    direction=None, prompt=None, answer=None) for composite in composites]


def setting_last_token_pairs(cfg: DictConfig) -> list[LastTokenPair]:
    """`cfg.n_pairs` last-token pairs of `cfg.setting`: drawn (synthetic, `cfg.counterfactual` design) or from the
    What'sUp composites (a clean composite and one with the same reference and two other objects)."""
    setting = Setting.from_config(cfg.setting)
    if setting_source(cfg) == "whatsup":
        if cfg.counterfactual != "shared_reference":
            raise UsageError(f"What'sUp last-token pairs share the reference; counterfactual={cfg.counterfactual} "
                             f"is for synthetic settings")
        return whatsup_last_token_pairs(load_composites(cfg), setting, cfg.n_pairs, cfg.seed)
    grid, layout = Grid.from_config(cfg.model.grid), Layout.from_config(cfg.model.layout)
    return last_token_pairs(setting, grid, layout, cfg.n_pairs, cfg.seed, tuple(cfg.orientations), cfg.counterfactual)


def setting_mirror_pairs(cfg: DictConfig, boxes: bool = False) -> tuple[list[MirrorPair], dict | None]:
    """`cfg.n_pairs` mirror pairs of `cfg.setting`, and for What'sUp the record of the composites left out (None
    for a synthetic setting): drawn (synthetic: the side items swapped in place) or What'sUp composites against
    their mirror (`setting.mirror`: data, the dataset's photos in the other order, or flip); with `boxes` (object
    patching) only composites whose items, and their mirror's, have boxes."""
    setting = Setting.from_config(cfg.setting)
    if setting_source(cfg) == "whatsup":
        return whatsup_mirror_pairs(load_whatsup(cfg), cfg.n_pairs, cfg.seed, str(cfg.setting.get("mirror", "data")),
                                    boxes=boxes)
    grid, layout = Grid.from_config(cfg.model.grid), Layout.from_config(cfg.model.layout)
    return mirror_pairs(setting, grid, layout, cfg.n_pairs, cfg.seed, tuple(cfg.orientations)), None
