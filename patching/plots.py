"""Drawing saved patching sweeps: probability of each outcome against the patched site, mean across pairs
with a +-1 standard deviation band (the spread across pairs, named in the legend), one panel per model and
setting; a unit that measures nothing (common.results.measures_nothing: the model never gives the setting's
answers) gets a panel saying so instead of flat zeros. Used by the figure directories' plot scripts; reads
results only, never a model."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from common.cli import no_results  # noqa: E402
from common.results import find_units, load_unit, measures_nothing  # noqa: E402


def load_sweeps(results: Path, experiment: str) -> list[tuple[str, str, dict, dict]]:
    """[(model, setting, metrics, arrays)] of every finished unit, settings in paper order."""
    units = []
    for directory in find_units(results, experiment):
        record, arrays = load_unit(directory)
        units.append((directory.parent.name, directory.name, record["metrics"], arrays))
    return units


def plot_sweeps(units, outcomes: dict[str, str], title: str, out: Path, name: str,
                orientation: str | None = None) -> Path:
    """One panel per unit: for each outcome key in `outcomes` ({key: legend label}) the mean probability
    across pairs at each site with a +-1 std band. `orientation` keeps only that orientation's pairs.
    Writes and returns out/<name>[_<orientation>].png."""
    columns = min(3, len(units))
    rows = -(-len(units) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (model, setting, metrics, arrays) in zip(axes.flat, units, strict=False):
        nothing = measures_nothing(metrics)
        if nothing:
            say_nothing(ax, f"{model} / {setting}", nothing)
            continue
        keep = np.ones(len(arrays["orientation"]), bool) if orientation is None else arrays["orientation"] == orientation
        sites = [str(s) for s in arrays["sites"]]
        x = np.arange(len(sites))
        for key, label in outcomes.items():
            values = arrays[f"p_{key}"][keep]
            if values.size == 0:
                continue
            mean, std = values.mean(0), values.std(0)
            ax.plot(x, mean, label=label, lw=1.6)
            ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), alpha=0.2)
        step = max(1, len(sites) // 10)
        ticks = [i for i in x if sites[i] == "visual" or int(sites[i]) % step == 0]
        ax.set_xticks(ticks, ["emb" if sites[i] == "visual" else sites[i] for i in ticks], fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("patched site: emb = visual embeddings, then LM layer" if "visual" in sites
                      else "patched LM layer", fontsize=7)
        ax.set_ylabel("probability", fontsize=8)
        ax.set_title(f"{model} / {setting} (n={int(keep.sum())})", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(units):]:
        ax.axis("off")
    drawn = [ax for ax in axes.flat if ax.get_lines()]
    if drawn:
        handles, labels = drawn[0].get_legend_handles_labels()
        handles.append(Patch(color="0.5", alpha=0.3))
        labels.append("shaded: +-1 s.d. across pairs, in its curve's colour")
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)   # below the panels
    fig.suptitle(title + (f" ({orientation})" if orientation else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{name}_{orientation}.png" if orientation else f"{name}.png")
    fig.savefig(path, dpi=140)
    plt.close(fig)
    return path


def say_nothing(ax, title: str, why: str) -> None:
    """A panel that measures nothing: its title and the reason, in place of the axes."""
    ax.set_title(title, fontsize=9)
    ax.text(0.5, 0.5, "\n".join(_wrap(why, 42)), ha="center", va="center", fontsize=8, transform=ax.transAxes,
            color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def sweep_summary(units, outcomes: dict[str, str]) -> str:
    """Markdown: per unit and outcome, the site where the mean peaks and its value, and the unpatched means (a
    unit that measures nothing: one row saying why)."""
    lines = ["| model | setting | outcome | unpatched clean | peak site | peak mean |", "|---|---|---|---|---|---|"]
    for model, setting, metrics, _arrays in units:
        nothing = measures_nothing(metrics)
        if nothing:
            lines.append(f"| {model} | {setting} | {nothing} | | | |")
            continue
        for key, label in outcomes.items():
            stats = metrics["outcomes"][key]
            peak = int(np.argmax(stats["mean"]))
            lines.append(f"| {model} | {setting} | {label} | {stats['unpatched_clean']:.3f} | "
                         f"{metrics['sites'][peak]} | {stats['mean'][peak]:.3f} |")
    return "\n".join(lines) + "\n"


def draw_figure(results: Path, out: Path, experiment: str, outcomes: dict[str, str], title: str,
                figure: str) -> int:
    """The whole plot of a sweep figure (figures/<figure>/plot.py): all panels, one PNG per orientation, and
    summary.md. UsageError when there are no results."""
    units = load_sweeps(results, experiment)
    if not units:
        raise no_results(experiment, results, figure)
    written = [plot_sweeps(units, outcomes, title, out, experiment)]
    written += [plot_sweeps(units, outcomes, title, out, experiment, o) for o in ("horizontal", "vertical")]
    summary = sweep_summary(units, outcomes)
    (out / "summary.md").write_text(summary)
    print(summary + "written: " + ", ".join(str(p) for p in written))
    return 0
