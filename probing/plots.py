"""Drawing for figures/fig04_probes and figures/fig31_grid_probes, from saved results only (no model).

Each row of a figure is one probe: an example test image with its token grid, the mean probability of each
class per token cell, and the argmax map (per-cell mode over the test images); item cells are outlined.
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from common.results import find_units, fmt_metric, load_unit  # noqa: E402


def _outline_items(ax, boxes: np.ndarray) -> None:
    """Outline token boxes (row0, col0, row1, col1) on a rows x cols image axis."""
    for row0, col0, row1, col1 in boxes:
        ax.add_patch(Rectangle((col0 - 0.5, row0 - 0.5), col1 - col0, row1 - row0, fill=False, ec="white", lw=0.8))


def draw_probe_row(axes, arrays: dict, name: str, target: str, title: str):
    """Panels for probe `name` (predicting `target`) of a results unit on `axes` (2 + classes of them);
    returns the probability image, for a colorbar."""
    image, mean_prob = arrays[f"{name}.example_image"], arrays[f"{name}.mean_prob"]
    argmax_map, boxes = arrays[f"{name}.argmax_map"], arrays[f"{name}.example_item_box"]
    classes = arrays[f"{name}.classes"]
    rows, cols = argmax_map.shape
    height, width = image.shape[:2]
    axes[0].imshow(image)
    for c in range(1, cols):
        axes[0].axvline(c * width / cols - 0.5, color="0.75", lw=0.3)
    for r in range(1, rows):
        axes[0].axhline(r * height / rows - 0.5, color="0.75", lw=0.3)
    axes[0].set_title(title, fontsize=7)
    for ax, c in zip(axes[1:], range(len(classes)), strict=False):
        shown = ax.imshow(mean_prob[c], vmin=0, vmax=1, cmap="viridis")
        _outline_items(ax, boxes)
        ax.set_title(f"P({target} = {classes[c]})", fontsize=7)
    ax = axes[1 + len(classes)]
    ax.imshow(argmax_map, vmin=classes.min() - 0.5, vmax=classes.max() + 0.5,
              cmap=plt.get_cmap("tab10", max(len(classes), 2)))
    _outline_items(ax, boxes)
    for (r, c), label in np.ndenumerate(argmax_map):
        ax.text(c, r, str(label), ha="center", va="center", fontsize=4, color="white")
    ax.set_title("argmax (mode over test images)", fontsize=7)
    for ax in axes[2 + len(classes):]:
        ax.set_visible(False)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return shown


def summary_table(rows: list[tuple]) -> str:
    lines = ["| model | setting | probe | test accuracy (items) | strip agreement | train accuracy | images (train / test) |",
             "|---|---|---|---|---|---|---|"]
    for model, setting, name, m in rows:
        lines.append(f"| {model} | {setting} | {name} | {fmt_metric(m['test_accuracy'])} | {fmt_metric(m['strip_agreement'])} | "
                     f"{fmt_metric(m['train_accuracy'])} | {m['n_train_images']} / {m['n_test_images']} |")
    return "\n".join(lines) + "\n"


def draw_figure(results: Path, out: Path, experiment: str, group: Callable[[dict], str], script: str) -> int:
    """One PNG per unit of `experiment` and probe group (`group(probe_metrics)` names it, "" for one PNG per
    unit), a row per probe, plus summary.md and summary.json. Returns the exit code: 2 without results."""
    units = find_units(results, experiment)
    if not units:
        print(f"error: no {experiment} results under {Path(results) / experiment}; run {script} first", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    table, written = [], []
    for unit in units:
        record, arrays = load_unit(unit)
        model, setting, probes = unit.parent.name, unit.name, record["metrics"]["probes"]
        groups = {}
        for name, m in probes.items():
            groups.setdefault(group(m), []).append(name)
            table.append((model, setting, name, m))
        for suffix, names in groups.items():
            n_cols = 2 + max(len(arrays[f"{n}.classes"]) for n in names)
            fig, axes = plt.subplots(len(names), n_cols, figsize=(2 * n_cols, 2.3 * len(names)),
                                     squeeze=False, layout="constrained")
            for row, name in zip(axes, names, strict=True):
                m = probes[name]
                shown = draw_probe_row(row, arrays, name, m["target"], f"{model} {setting} {name}\ntest acc {fmt_metric(m['test_accuracy'], 2)}, "
                                                  f"strip agr {fmt_metric(m['strip_agreement'], 2)}")
            bar = fig.colorbar(shown, ax=axes, shrink=0.5, pad=0.01)
            bar.set_label("mean probability over test images", fontsize=7)
            bar.ax.tick_params(labelsize=6)
            path = out / f"{experiment}_{model}_{setting}{'_' + suffix if suffix else ''}.png"
            fig.savefig(path, dpi=150)
            plt.close(fig)
            written.append(path.name)
    summary = summary_table(table)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps(
        [{"model": mo, "setting": s, "probe": n, **{k: m[k] for k in ("test_accuracy", "strip_agreement",
                                                                     "train_accuracy")}} for mo, s, n, m in table],
        indent=1))
    print(summary + f"\n{len(written)} figures written to {out}")
    return 0
