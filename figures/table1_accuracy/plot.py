"""Redraw paper Table 1 (accuracy per model and setting) and Table 4 (per queried direction) from
results/accuracy/<model>/<setting>/metrics.json. Writes table1.md, table4.md and table1_accuracy.png."""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.results import find_units, fmt_metric, setting_rank  # noqa: E402

DIRECTIONS = ["left", "right", "above", "below"]


def load(results: Path) -> dict:
    """{(model, setting): metrics} for every finished accuracy unit."""
    return {(unit.parent.name, unit.name): json.loads((unit / "metrics.json").read_text())["metrics"]
            for unit in find_units(results, "accuracy")}


def markdown(table: dict, models, settings) -> tuple[str, str]:
    t1 = ["| model | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for m in models:
        t1.append(f"| {m} | " + " | ".join(fmt_metric(table.get((m, s), {}).get("accuracy"), 2) for s in settings) + " |")
    cols = [(s, d) for s in settings for d in DIRECTIONS
            if any(table.get((m, s), {}).get("by_direction", {}).get(d) is not None for m in models)]
    t4 = ["| model | " + " | ".join(f"{s} {d[0].upper()}" for s, d in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in models:
        t4.append(f"| {m} | " + " | ".join(fmt_metric(table.get((m, s), {}).get("by_direction", {}).get(d), 2)
                                           for s, d in cols) + " |")
    return "\n".join(t1) + "\n", "\n".join(t4) + "\n"


def draw(table: dict, models, settings, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(settings) * 3, 1.2 + 0.6 * len(models)),
                             gridspec_kw={"width_ratios": [len(settings), len(settings) * len(DIRECTIONS)]})
    grids = [
        ("Table 1: accuracy", settings, lambda m, s: table.get((m, s), {}).get("accuracy")),
        ("Table 4: accuracy per queried direction",
         [f"{s}\n{d}" for s in settings for d in DIRECTIONS],
         lambda m, c: table.get((m, c.split("\n")[0]), {}).get("by_direction", {}).get(c.split("\n")[1])),
    ]
    for ax, (title, cols, get) in zip(axes, grids, strict=True):
        values = np.array([[np.nan if get(m, c) is None else get(m, c) for c in cols] for m in models], float)
        ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        ax.set_yticks(range(len(models)), models, fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "table1_accuracy.png", dpi=150)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    table = load(args.results)
    if not table:
        print(f"error: no accuracy results under {args.results / 'accuracy'}; run scripts/table1_accuracy.sh first",
              file=sys.stderr)
        return 2
    models = sorted({m for m, _ in table})
    settings = sorted({s for _, s in table}, key=setting_rank)
    args.out.mkdir(parents=True, exist_ok=True)
    t1, t4 = markdown(table, models, settings)
    (args.out / "table1.md").write_text(t1)
    (args.out / "table4.md").write_text(t4)
    draw(table, models, settings, args.out)
    print(t1 + "\n" + t4 + f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
