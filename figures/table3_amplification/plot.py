"""Redraw paper Table 3 (probe amplification against no intervention, random directions, ScalingVis and
AdaptVis on What'sUp composites, plus an image-attention reweighting that is not ScalingVis) from
results/amplification/<model>/<setting>/metrics.json: table3.md, table3.json and one PNG of alpha curves per
model and setting. Each unit says its protocol: val_test (values chosen on val, reported on test) or paper (the
best value over the grid on all composites, the paper's "up to")."""

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.cli import no_results, plot_main  # noqa: E402
from common.results import find_units, measures_nothing  # noqa: E402

LABELS = {"none": "None", "random": "Random amp.", "scalingvis": "ScalingVis", "adaptvis": "AdaptVis",
          "image_attention_reweighting": "Attention reweighting (not ScalingVis)", "probe": "Ordering amp."}
ORDER = ["none", "random", "scalingvis", "adaptvis", "image_attention_reweighting", "probe"]
METRICS = ("accuracy", "corrected", "broken")


def setting_text(chosen: dict) -> str:
    """The setting chosen on val: 'alpha 5', 'coefficient 0.8', 'weight1 0.5, weight2 1.5, threshold 0.4'."""
    return ", ".join(f"{name} {value:g}" for name, value in chosen.items())


def pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


PROTOCOL_LABELS = {"val_test": "chosen on val, test", "paper": "paper: best on all composites (up to)"}


def rows(metrics: dict) -> list[tuple[str, dict]]:
    """(label, metrics at the chosen value on the report split) in the paper's order; the None row first over the
    report split, then over every composite (the paper's None, its Table 1 What'sUp column)."""
    table = metrics["table"]
    out = [(LABELS[method], {**table[method], "method": method}) for method in ORDER if method in table]
    every = metrics["none_all_composites"]
    out.insert(1, ("None (all composites)", {**every, "method": "none", "split": "all"}))
    return out


def markdown(units: list[tuple[str, str, dict]]) -> str:
    lines = ["| model | setting | protocol | intervention | chosen | acc. | % corr. fail. | % broken | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for model, setting, metrics in units:
        protocol = PROTOCOL_LABELS[metrics.get("protocol", "val_test")]
        nothing = measures_nothing(metrics)
        if nothing:
            lines.append(f"| {model} | {setting} | {protocol} | {nothing} | | | | | |")
            continue
        for label, m in rows(metrics):
            kind = m["method"].split(".")[0]
            chosen = setting_text(m["chosen"]) if "chosen" in m else "–"
            corrected = "–" if kind == "none" else pct(m["corrected"])
            broken = "–" if kind == "none" else pct(m["broken"])
            accuracy = f"{m['accuracy']:.2f}" + (" (all)" if m.get("split") == "all" else "")
            sd = f" ± {m['accuracy_sd']:.2f}" if "accuracy_sd" in m else ""
            lines.append(f"| {model} | {setting} | {protocol} | {label} | {chosen} | {accuracy}{sd} | {corrected} | "
                         f"{broken} | {m['n']} |")
        probe = metrics["probe"]
        if "composites" in probe:
            used = {split: r["used"] for split, r in probe["composites"].items()}
            dropped = {split: r["dropped_box_not_found"] + r["dropped_box_outside"]
                       for split, r in probe["composites"].items()}
            notes.append(f"- {model} {setting}: probe ({probe.get('rows', 'multinomial')} rows) fit on {used['train']} "
                         f"train composites with boxes, test accuracy {probe['test_accuracy']:.2f} on "
                         f"{used['test']}; composites dropped for missing boxes: {dropped['train']} of "
                         f"{probe['composites']['train']['n']} (train), {dropped['test']} of "
                         f"{probe['composites']['test']['n']} (test)")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def draw_curves(model: str, setting: str, metrics: dict, path: Path) -> None:
    """Accuracy, % corrected and % broken against alpha on the grid split (val: dashed; all composites under the
    paper protocol: solid), probe and random directions; the report split's value at the chosen alpha as a dot
    (val_test); no intervention as grey lines; the chosen alpha dotted. A unit that measures nothing gets the
    reason in place of the curves."""
    nothing = measures_nothing(metrics)
    if nothing:
        fig, ax = plt.subplots(figsize=(6, 2), layout="constrained")
        ax.axis("off")
        ax.text(0.5, 0.5, f"{model} {setting}: amplification\n{nothing}", ha="center", va="center", fontsize=9,
                wrap=True)
        fig.savefig(path, dpi=150)
        plt.close(fig)
        return
    alphas = metrics["alphas"]
    grid_split, report_split = metrics.get("grid_split", "val"), metrics.get("report_split", "test")
    style = "--" if grid_split == "val" else "-"
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharex=True, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = [m for m in metrics["splits"][grid_split] if m.split(".")[0] in ("probe", "random")]
    for ax, key in zip(axes, METRICS, strict=True):
        for k, method in enumerate(methods):
            color = colors[k % len(colors)]
            curve = metrics["splits"][grid_split][method]["curve"]
            ax.plot(alphas, [c[key] for c in curve], style, color=color, marker=".",
                    label=f"{method} {grid_split}" if key == "accuracy" else None)
            if key == "accuracy" and method.startswith("random"):
                ax.fill_between(alphas, [c["accuracy"] - c["accuracy_sd"] for c in curve],
                                [c["accuracy"] + c["accuracy_sd"] for c in curve], color=color, alpha=0.15,
                                linewidth=0, label=f"{method} {grid_split}: +-1 s.d. across seeds")
            chosen = metrics["chosen"][method]["alpha"]
            if report_split != grid_split:
                ax.plot([chosen], [metrics["table"][method][key]], "o", color=color, markersize=7,
                        label=f"{method} {report_split} at chosen alpha" if key == "accuracy" else None)
            ax.axvline(chosen, color=color, linestyle=":", linewidth=1)
        if key == "accuracy":
            for split, line in ((grid_split, style), (report_split, "-")):
                if split in metrics["splits"]:
                    ax.axhline(metrics["splits"][split]["none"]["accuracy"], color="grey", linestyle=line,
                               label=f"none {split}")
                if split == grid_split == report_split:
                    break
        ax.set_xlabel("alpha")
        ax.set_title({"accuracy": "accuracy", "corrected": "previously wrong, now right",
                      "broken": "previously right, now wrong"}[key], fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=6)
    protocol = PROTOCOL_LABELS[metrics.get("protocol", "val_test")]
    fig.suptitle(f"{model} {setting}: amplification ({protocol}; dotted: the chosen alpha)", fontsize=10)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def draw(results: Path, out: Path) -> int:
    found = find_units(results, "amplification")
    if not found:
        raise no_results("amplification", results, "table3_amplification")
    out.mkdir(parents=True, exist_ok=True)
    units = [(u.parent.name, u.name, json.loads((u / "metrics.json").read_text())["metrics"]) for u in found]
    table = markdown(units)
    (out / "table3.md").write_text(table)
    (out / "table3.json").write_text(json.dumps(
        [{"model": mo, "setting": s, "intervention": label, **m} for mo, s, metrics in units
         for label, m in rows(metrics)], indent=1))
    for model, setting, metrics in units:
        draw_curves(model, setting, metrics, out / f"table3_{model}_{setting}_alpha.png")
    print(table + f"\n{len(units)} curve figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
