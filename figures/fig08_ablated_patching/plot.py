"""Redraw paper Fig. 8 (and 17, 18): object patching after ablation, probability of the clean answer (a)
and of the swapped answer (b) against the patched LM layer, from results/ablated_patching/."""

import sys
from pathlib import Path

from common.cli import plot_main
from patching.plots import draw_figure

OUTCOMES = {"clean": "P(a): clean answer", "swapped": "P(b): sides swapped"}


def draw(results: Path, out: Path) -> int:
    return draw_figure(results, out, "ablated_patching", OUTCOMES, "Object patching after ablation", "fig08_ablated_patching")


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
