"""Redraw paper Fig 33-35 (position probes on What'sUp composites) from results/whatsup_probes/<model>/whatsup/:
fig33_<model>.png, an example test composite with its token grid and each item's box labelled by position
(Fig 33), and whatsup_probes_<model>_whatsup.png, the probe's heat maps (Fig 34 Qwen, Fig 35 Gemma), plus
summary.md (with, per unit, the composites each split dropped for missing boxes)."""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from common.cli import plot_main  # noqa: E402
from common.results import find_units, load_unit  # noqa: E402
from probing.plots import draw_figure  # noqa: E402

POSITIONS = ("0 left object", "1 reference", "2 right object")


def composite_lines(unit: Path) -> list[str]:
    """Per split the probe read: composites, those with boxes, those dropped (box not found / outside its part),
    those used."""
    record, _ = load_unit(unit)
    lines = []
    for split, r in record["metrics"].get("whatsup_composites", {}).items():
        lines.append(f"- {unit.parent.name} {split}: {r['used']} composites used of {r['with_boxes']} with boxes "
                     f"({r['n']} in the split; dropped for missing boxes: {r['dropped_box_not_found']} not found, "
                     f"{r['dropped_box_outside']} outside their part)")
    return lines


def draw_boxes(unit: Path, path: Path) -> None:
    """The unit's example test composite, token grid faint, item token boxes outlined and labelled."""
    _, arrays = load_unit(unit)
    image, boxes = arrays["horizontal.example_image"], arrays["horizontal.example_item_box"]
    rows, cols = arrays["horizontal.argmax_map"].shape
    height, width = image.shape[:2]
    ppt_y, ppt_x = height / rows, width / cols
    fig, ax = plt.subplots(figsize=(4, 4), layout="constrained")
    ax.imshow(image)
    for c in range(1, cols):
        ax.axvline(c * ppt_x - 0.5, color="white", lw=0.4, alpha=0.6)
    for r in range(1, rows):
        ax.axhline(r * ppt_y - 0.5, color="white", lw=0.4, alpha=0.6)
    colors = plt.get_cmap("tab10")
    for k, (row0, col0, row1, col1) in enumerate(boxes):
        ax.add_patch(Rectangle((col0 * ppt_x - 0.5, row0 * ppt_y - 0.5), (col1 - col0) * ppt_x, (row1 - row0) * ppt_y,
                               fill=False, edgecolor=colors(k), lw=2))
        ax.text(col0 * ppt_x + 3, row0 * ppt_y + 12, POSITIONS[k], color="white", fontsize=7,
                bbox={"facecolor": colors(k), "alpha": 0.8, "pad": 1, "lw": 0})
    ax.set_title(f"{unit.parent.name}: item boxes on the {rows} x {cols} token grid", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.savefig(path, dpi=150)
    plt.close(fig)


def draw(results: Path, out: Path) -> int:
    code = draw_figure(results, out, "whatsup_probes", group=lambda m: "", script="scripts/fig33_whatsup_probes.sh")
    if code == 0:
        lines = []
        for unit in find_units(results, "whatsup_probes"):
            draw_boxes(unit, out / f"fig33_{unit.parent.name}.png")
            lines += composite_lines(unit)
        if lines:
            with open(out / "summary.md", "a") as summary:
                summary.write("\nComposites per split (one set for every What'sUp experiment; those whose boxes are "
                              "missing are dropped here):\n" + "\n".join(lines) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
