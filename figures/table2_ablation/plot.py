"""Redraw paper Table 2 (accuracy after ablating ordering from the visual embeddings, per model and
setting, next to the accuracy on the same images unablated) and Table 5 (per queried direction), from
results/ablation/<model>/<setting>/metrics.json. Writes table2.md, table5.md and table2_ablation.png. Chance is
shown both ways, labelled: the paper's 33.3% (one of the image's three items, section 5.3.1) and one over the
number of candidate answers."""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.cli import no_results, plot_main  # noqa: E402
from common.results import fmt_metric  # noqa: E402
from patching.plots import load_sweeps  # noqa: E402

DIRECTIONS = ["left", "right", "above", "below"]


def chance(metrics: dict) -> tuple[float, float]:
    """(the paper's chance: one of the image's items, one of the candidate answers) of a unit (results written
    before both were recorded hold the second only; the first is then 1/3, three items per image)."""
    recorded = metrics.get("chance", {})
    return recorded.get("items", 1 / 3), recorded.get("candidates", metrics["ablated"]["chance"])


def tables(units) -> tuple[str, str]:
    t2 = ["| model | setting | original | ablated | chance: one of 3 items (paper) | chance: one of the candidates |",
          "|---|---|---|---|---|---|"]
    t5 = ["| model | setting | " + " | ".join(DIRECTIONS) + " |", "|---|---|" + "---|" * len(DIRECTIONS)]
    for model, setting, metrics, _ in units:
        original, ablated = metrics["original"], metrics["ablated"]
        items, candidates = chance(metrics)
        t2.append(f"| {model} | {setting} | {fmt_metric(original['accuracy'], 2)} | {fmt_metric(ablated['accuracy'], 2)} | "
                  f"{fmt_metric(items, 3)} | {fmt_metric(candidates, 3)} |")
        t5.append(f"| {model} | {setting} | " +
                  " | ".join(fmt_metric(ablated["by_direction"].get(d), 2) for d in DIRECTIONS) + " |")
    return "\n".join(t2) + "\n", "\n".join(t5) + "\n"


def draw_bars(units, out: Path) -> Path:
    labels = [f"{m}\n{s}" for m, s, _, _ in units]
    original = [u[2]["original"]["accuracy"] for u in units]
    ablated = [u[2]["ablated"]["accuracy"] for u in units]
    items, candidates = zip(*(chance(u[2]) for u in units), strict=True)
    x = np.arange(len(units))
    fig, ax = plt.subplots(figsize=(3.2 + 1.3 * len(units), 3.2))
    ax.bar(x - 0.2, original, 0.4, label="original embeddings")
    ax.bar(x + 0.2, ablated, 0.4, label="ordering ablated")
    ax.scatter(x, items, marker="_", s=600, color="k", label="chance: one of 3 items (paper, 33.3%)", zorder=3)
    ax.scatter(x, candidates, marker="_", s=400, color="grey", label="chance: one of the candidates", zorder=3)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("Table 2: accuracy after ablating ordering from the visual embeddings", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)   # beside the bars
    fig.tight_layout()
    path = out / "table2_ablation.png"
    fig.savefig(path, dpi=140)
    plt.close(fig)
    return path


def draw(results: Path, out: Path) -> int:
    units = load_sweeps(results, "ablation")
    if not units:
        raise no_results("ablation", results, "table2_ablation")
    out.mkdir(parents=True, exist_ok=True)
    t2, t5 = tables(units)
    (out / "table2.md").write_text(t2)
    (out / "table5.md").write_text(t5)
    print(t2 + "\n" + t5 + f"\nwritten: {draw_bars(units, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
