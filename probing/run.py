"""Linear probes on the visual embeddings of one model and setting (docs/experiments.md, "probes", paper Fig 4,
19-30; "grid_probes", Fig 31, 32; "whatsup_probes", Fig 33-35), saved under results/<experiment>/<model>/<setting>/.

    python -m runner experiment=probes model=qwen2vl_7b setting=squares [n_train=90 n_test=30 probe.C=1.0]
    python -m runner experiment=grid_probes model=gemma3_4b setting=shapes
    python -m runner experiment=whatsup_probes model=qwen2vl_7b data.whatsup_dir=DIR

Per probe: embeddings of n_train training and n_test test images
(cached, see probing.extract), a probe fit on the training images' item tokens, its accuracy on the test
images' item tokens, and the probe applied to every token of the test images (probing.heatmaps). The unit
holds each probe's weights (probing.probes.load_probe reads them back), heat maps, an example image and
the metrics. The model is loaded only when an embedding split is not cached yet.

whatsup_probes: one horizontal probe on What'sUp composites (setting whatsup), trained on the tokens inside
the item boxes of the first n_train composites (default 90, as the paper's every setting; null: all) of the train
split that have boxes, tested on the first n_test (default 30) of the test split that have boxes; labels are
the items' positions (0 left object, 1 reference, 2 right object). The splits are those of every What'sUp
experiment (drawn from the seed alone); how many composites each split dropped for missing boxes is recorded
(`whatsup_composites`).
"""

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from common.errors import UsageError, check_choice
from common.geometry import ORIENTATIONS, Grid, Layout
from common.results import fmt_metric
from data_gen.samples import setting_source
from data_gen.settings import Setting
from data_gen.whatsup import require_boxes, split_sizes, whatsup_root
from probing.extract import (
    Embeddings,
    check_arrangement,
    check_count,
    grid_size,
    load_or_extract,
    whatsup_probe_composites,
)
from probing.heatmaps import heat_map, nearest_item_labels, strip_agreement, token_probabilities
from probing.probes import Probe, fit_item_probe, item_examples

EXPERIMENTS = ("probes", "grid_probes", "whatsup_probes")
GRID_TARGETS = ("row", "col", "cell")
DEFINITIONS = {
    "heat_map": "mean_prob: mean over test images of each token's class probability; argmax_map: per-cell mode "
                "of each test image's argmax class (ties to the lower class)",
    "strip_agreement": "fraction of non-item test tokens whose argmax equals the label of the nearest item, "
                       "distance along the probe's axes (cols: horizontal / col probe, rows: vertical / row probe, "
                       "both: cell probe) to the item's token box; tokens tied between two labels left out",
    "splits": "train and test are disjoint slices [0, n_train) and [n_train, n_train + n_test) of one seeded "
              "sequence of distinct item arrangements; What'sUp: the first n_train / n_test composites with boxes "
              "of the train and test splits",
    "whatsup_composites": "per What'sUp split: its composites (n), those whose objects have boxes, those dropped "
                          "because a needed box is null (not found) or falls outside its part, and those used",
}


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: `name` (horizontal, vertical, 2x2_row, ...), the `arrangement` it reads and the `target`
    it predicts (position for lines; row, col or cell for grids)."""

    name: str
    arrangement: str
    target: str



def probe_specs(cfg: DictConfig) -> list[ProbeSpec]:
    """The probes of `cfg.experiment.name`; UsageError for an unknown orientation, grid size or target."""
    if cfg.experiment.name in ("probes", "whatsup_probes"):
        orientations = list(cfg.orientations)
        if not orientations:
            raise UsageError("orientations is empty; allowed: " + ", ".join(ORIENTATIONS))
        for o in orientations:
            check_choice("orientation", o, ORIENTATIONS)
        return [ProbeSpec(o, o, "position") for o in orientations]
    sizes, targets = list(cfg.grid_sizes), list(cfg.grid_targets)
    if not sizes or not targets:
        raise UsageError("grid_sizes and grid_targets must be non-empty, e.g. grid_sizes=[2,3] grid_targets=[row,col]")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise UsageError(f"grid_sizes holds {n!r}; a grid size is an integer >= 2 (2 for 2x2, 3 for 3x3)")
    for t in targets:
        check_choice("grid target", t, GRID_TARGETS)
    return [ProbeSpec(f"{n}x{n}_{t}", f"{n}x{n}", t) for n in sizes for t in targets]


def check_inputs(cfg: DictConfig, setting: Setting, specs: list[ProbeSpec]) -> None:
    """Every UsageError the run could hit, raised before anything is extracted or written."""
    if setting_source(cfg) == "whatsup":
        if [s.arrangement for s in specs] != ["horizontal"]:
            raise UsageError(f"setting {setting.name!r} has horizontal composites only: use experiment=whatsup_probes "
                             f"(orientations=[horizontal]), got {[s.name for s in specs]}")
        whatsup_root(cfg.data.whatsup_dir, str(cfg.setting.subset))
        require_boxes(cfg, f"experiment={cfg.experiment.name}")
    elif cfg.experiment.name == "whatsup_probes":
        raise UsageError(f"whatsup_probes needs setting=whatsup, got setting={setting.name}")
    for key in ("n_train", "n_test"):
        value = cfg[key]
        if value is None and setting_source(cfg) == "whatsup":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            classes = "positions" if cfg.experiment.name == "probes" else "rows, columns or cells"
            raise UsageError(f"{key}={value!r}: a probe needs at least 1 {key[2:]} image so that all its "
                             f"classes ({classes}) have tokens")
    if not float(cfg.probe.C) > 0:
        raise UsageError(f"probe.C={cfg.probe.C} must be positive (inverse regularisation strength)")
    if setting_source(cfg) == "whatsup":
        whatsup_probe_composites(cfg)       # reads the data: bad photos, boxes or empty splits stop here
        return
    grid, layout = Grid.from_config(cfg.model.grid), Layout.from_config(cfg.model.layout)
    for arrangement in dict.fromkeys(s.arrangement for s in specs):
        check_arrangement(grid, layout, arrangement)
        check_count(setting, arrangement, cfg.n_train + cfg.n_test)


def labels_and_axes(emb: Embeddings, spec: ProbeSpec) -> tuple[np.ndarray, tuple[str, ...]]:
    """(labels (n_images, n_items), the grid axes along which the label changes)."""
    position = emb.item_position
    if spec.target == "position":
        return position[..., 0], ("col",) if spec.arrangement == "horizontal" else ("row",)
    n = grid_size(spec.arrangement)
    row, col = position[..., 0], position[..., 1]
    return {"row": (row, ("row",)), "col": (col, ("col",)), "cell": (row * n + col, ("row", "col"))}[spec.target]


def evaluate(probe: Probe, emb: Embeddings, labels: np.ndarray, axes) -> tuple[dict, dict]:
    """Metrics and arrays of `probe` on split `emb`: item-token accuracy, heat maps over every token, strip
    agreement, confusion, and the first image with its item and nearest-item label maps."""
    probs = token_probabilities(probe, emb.tokens)                                   # (n, T, k)
    predicted = probe.classes[probs.argmax(-1)]                                      # (n, T)
    x, y = item_examples(emb.tokens, emb.item_tokens, labels)
    item_predicted = probe.predict(x)
    expected = np.stack([nearest_item_labels(emb.grid_shape, boxes, lab, axes)
                         for boxes, lab in zip(emb.item_box, labels, strict=True)])
    strip, counted = strip_agreement(predicted, expected)
    mean_prob, argmax_map, agreement = heat_map(predicted, probs, probe.classes, emb.grid_shape)
    item_map = np.full(emb.tokens.shape[1], -1)
    for tokens, label in zip(emb.item_tokens[0], labels[0], strict=True):
        item_map[tokens[tokens >= 0]] = label
    index = {c: i for i, c in enumerate(probe.classes.tolist())}
    confusion = np.zeros((len(index), len(index)), np.int64)
    np.add.at(confusion, ([index[v] for v in y], [index[v] for v in item_predicted]), 1)
    shape = tuple(emb.grid_shape)
    metrics = {"test_accuracy": float((item_predicted == y).mean()), "strip_agreement": strip,
               "strip_tokens_counted": counted, "n_test_images": len(emb.tokens), "n_test_tokens": len(y),
               "classes": probe.classes.tolist(), "axes": list(axes)}
    arrays = {"mean_prob": mean_prob, "argmax_map": argmax_map, "argmax_agreement": agreement,
              "item_map": item_map.reshape(shape), "example_item_box": emb.item_box[0],
              "nearest_map": expected[0].reshape(shape),
              "example_argmax": predicted[0].reshape(shape), "example_image": emb.first_image,
              "confusion": confusion, "test_image_id": emb.image_id}
    return metrics, arrays


def train_test_embeddings(cfg: DictConfig, setting: Setting, arrangement: str, get_vlm):
    """((train Embeddings, path), (test Embeddings, path)): disjoint slices of one arrangement sequence, or
    the first n_train / n_test (null: all) composites with boxes of the What'sUp train and test splits."""
    if setting_source(cfg) == "whatsup":
        records = whatsup_probe_composites(cfg)
        return tuple(load_or_extract(cfg, setting, arrangement, 0, records[split]["used"], get_vlm, split=split)
                     for split in ("train", "test"))
    return (load_or_extract(cfg, setting, arrangement, 0, cfg.n_train, get_vlm),
            load_or_extract(cfg, setting, arrangement, cfg.n_train, cfg.n_train + cfg.n_test, get_vlm))


def probes(cfg: DictConfig, get_vlm):
    """The probes, grid_probes and whatsup_probes experiments: (metrics, arrays) of every probe of the
    experiment; the model is loaded (get_vlm) only when an embedding split is not cached yet."""
    name = cfg.experiment.name
    check_choice("probing experiment", name, EXPERIMENTS)
    setting = Setting.from_config(cfg.setting)
    specs = probe_specs(cfg)
    check_inputs(cfg, setting, specs)
    splits, metrics, arrays = {}, {}, {}
    for spec in specs:
        if spec.arrangement not in splits:
            splits[spec.arrangement] = train_test_embeddings(cfg, setting, spec.arrangement, get_vlm)
        (train, train_path), (test, test_path) = splits[spec.arrangement]
        train_labels, axes = labels_and_axes(train, spec)
        probe, fitted = fit_item_probe(cfg.probe, cfg.seed, train.tokens, train.item_tokens, train_labels)
        test_metrics, test_arrays = evaluate(probe, test, labels_and_axes(test, spec)[0], axes)
        metrics[spec.name] = {"train_accuracy": fitted["train_accuracy"], **test_metrics,
                              "n_train_images": fitted["n_train_images"], "n_train_tokens": fitted["n_train_tokens"],
                              "arrangement": spec.arrangement, "target": spec.target,
                              "embeddings": {"train": str(train_path), "test": str(test_path)}}
        arrays.update(probe.to_arrays(spec.name))
        arrays.update({f"{spec.name}.{key}": value for key, value in test_arrays.items()})
        arrays[f"{spec.name}.train_image_id"] = train.image_id
    out = {"probes": metrics, "definitions": DEFINITIONS}
    if setting_source(cfg) == "whatsup":
        out["whatsup_composites"] = whatsup_probe_composites(cfg)
    return out, arrays


# --- for the runner ----------------------------------------------------------------------------------------

def check(cfg: DictConfig) -> None:
    """Every UsageError a probing run raises on its config (check_inputs), before a model loads."""
    check_choice("probing experiment", cfg.experiment.name, EXPERIMENTS)
    check_inputs(cfg, Setting.from_config(cfg.setting), probe_specs(cfg))


def passes(cfg: DictConfig) -> dict:
    """What a unit runs (runner.paper --dry-run): vision passes only, one per image of each arrangement's train
    and test splits (cached embeddings are not recomputed); What'sUp: the composites of its train and test
    splits (data_gen.whatsup.split_sizes of `setting.n_composites`; None when it is null)."""
    if setting_source(cfg) == "whatsup":
        n = cfg.setting.get("n_composites")
        if n is None:
            return {"lm": 0, "vision": None, "patched": 0}
        sizes = split_sizes(int(n), cfg.setting.splits)
        images = sum(sizes[split] if cfg[key] is None else min(int(cfg[key]), sizes[split])
                     for key, split in (("n_train", "train"), ("n_test", "test")))
        return {"lm": 0, "vision": images, "patched": 0}
    arrangements = len({spec.arrangement for spec in probe_specs(cfg)})
    return {"lm": 0, "vision": arrangements * (int(cfg.n_train) + int(cfg.n_test)), "patched": 0}


def summary(metrics: dict) -> str:
    """Each probe's test accuracy on item tokens and strip agreement."""
    return "test accuracy (strip agreement): " + ", ".join(
        f"{name} {m['test_accuracy']:.2f} ({fmt_metric(m['strip_agreement'], 2)})" for name, m in metrics["probes"].items())
