"""Redraw paper Table 1 (accuracy per model and setting) and Table 4 (per queried direction) from
results/accuracy/<model>/<setting>/metrics.json. Writes table1.md, table4.md and two table images,
table1_accuracy.png (models x settings) and table4_by_direction.png (model and setting x direction). A cell whose
unit measures nothing (the model never gives the setting's answers: common.results.measures_nothing) is marked
with * and the reason is written under the table."""

import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.cli import no_results, plot_main  # noqa: E402
from common.results import find_units, fmt_metric, measures_nothing, setting_rank  # noqa: E402

DIRECTIONS = ["left", "right", "above", "below"]


def load(results: Path) -> dict:
    """{(model, setting): metrics} for every finished accuracy unit."""
    return {(unit.parent.name, unit.name): json.loads((unit / "metrics.json").read_text())["metrics"]
            for unit in find_units(results, "accuracy")}


def markdown(table: dict, models, settings) -> tuple[str, str]:
    def cell(m, s, value):
        return fmt_metric(value, 2) + (" *" if measures_nothing(table.get((m, s), {})) else "")

    t1 = ["| model | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for m in models:
        t1.append(f"| {m} | " + " | ".join(cell(m, s, table.get((m, s), {}).get("accuracy")) for s in settings) + " |")
    cols = [(s, d) for s in settings for d in DIRECTIONS
            if any(table.get((m, s), {}).get("by_direction", {}).get(d) is not None for m in models)]
    t4 = ["| model | " + " | ".join(f"{s} {d[0].upper()}" for s, d in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in models:
        t4.append(f"| {m} | " + " | ".join(cell(m, s, table.get((m, s), {}).get("by_direction", {}).get(d))
                                           for s, d in cols) + " |")
    notes = footnotes(table)
    return "\n".join(t1) + "\n" + notes, "\n".join(t4) + "\n" + notes


def footnotes(table: dict) -> str:
    lines = [f"\n\\* {m} / {s}: {why}" for (m, s), metrics in sorted(table.items())
             if (why := measures_nothing(metrics))]
    return "".join(lines) + ("\n" if lines else "")


def draw_table(path: Path, title: str, row_labels: list[str], col_labels: list[str], cells: list[list],
               nothing: list[list[bool]], notes: list[str]) -> None:
    """A table image: one row per label, values with two decimals on a red-to-green background (0 to 1), "–"
    for none, "*" where the unit measures nothing, the notes (wrapped) under it."""
    notes = [line for note in notes for line in textwrap.wrap(note, 100)]
    label_width = 0.25 + 0.085 * max(len(r) for r in row_labels)
    width = label_width + 1.0 * len(col_labels)
    table_height, note_height, title_height = 0.3 * (len(row_labels) + 1), 0.18 * len(notes), 0.4
    height = table_height + note_height + title_height + 0.1
    fig = plt.figure(figsize=(max(width, 0.075 * max([len(n) for n in notes], default=0)), height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    cmap = plt.get_cmap("RdYlGn")
    text = [[label] + [("–" if v is None else f"{v:.2f}" + (" *" if star else "")) for v, star in zip(row, stars, strict=True)]
            for label, row, stars in zip(row_labels, cells, nothing, strict=True)]
    colors = [["white"] + ["white" if v is None or star else (*cmap(v)[:3], 0.45) for v, star in zip(row, stars, strict=True)]
              for row, stars in zip(cells, nothing, strict=True)]
    left = (fig.get_figwidth() - width) / 2 / fig.get_figwidth()
    bottom = (note_height + 0.1) / height
    table = ax.table(cellText=text, cellColours=colors, colLabels=["", *col_labels], cellLoc="center",
                     bbox=(left, bottom, width / fig.get_figwidth(), table_height / height),
                     colWidths=[label_width] + [1.0] * len(col_labels))
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    ax.text(0.5, 1 - 0.5 * title_height / height, title, ha="center", va="center", fontsize=10)
    for k, note in enumerate(notes):
        ax.text(0.02, (note_height - 0.18 * (k + 0.5)) / height + 0.05 / height, note, fontsize=7, color="0.3",
                va="center")
    fig.savefig(path, dpi=150)
    plt.close(fig)


def draw_figures(table: dict, models, settings, out: Path) -> None:
    notes = [f"* {m} / {s}: {why}" for (m, s), metrics in sorted(table.items()) if (why := measures_nothing(metrics))]

    def starred(m, s):
        return bool(measures_nothing(table.get((m, s), {})))
    draw_table(out / "table1_accuracy.png", "Table 1: accuracy", models, settings,
               [[table.get((m, s), {}).get("accuracy") for s in settings] for m in models],
               [[starred(m, s) for s in settings] for m in models], notes)
    rows = [(m, s) for m in models for s in settings if (m, s) in table]
    draw_table(out / "table4_by_direction.png", "Table 4: accuracy per queried direction",
               [f"{m} / {s}" for m, s in rows], DIRECTIONS,
               [[table[(m, s)].get("by_direction", {}).get(d) for d in DIRECTIONS] for m, s in rows],
               [[starred(m, s)] * len(DIRECTIONS) for m, s in rows], notes)


def draw(results: Path, out: Path) -> int:
    table = load(results)
    if not table:
        raise no_results("accuracy", results, "table1_accuracy")
    models = sorted({m for m, _ in table})
    settings = sorted({s for _, s in table}, key=setting_rank)
    out.mkdir(parents=True, exist_ok=True)
    t1, t4 = markdown(table, models, settings)
    (out / "table1.md").write_text(t1)
    (out / "table4.md").write_text(t4)
    draw_figures(table, models, settings, out)
    print(t1 + "\n" + t4 + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
