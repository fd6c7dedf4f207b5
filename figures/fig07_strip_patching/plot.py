"""Redraw paper Fig. 7 (and 15, 16): strip patching, probability of the clean answer (a) and of the
swapped answer (b) against the patched site, from results/strip_patching/."""

import sys
from pathlib import Path

from common.cli import plot_main
from patching.plots import draw_figure

OUTCOMES = {"clean": "P(a): clean answer", "swapped": "P(b): sides swapped"}


def draw(results: Path, out: Path) -> int:
    return draw_figure(results, out, "strip_patching", OUTCOMES, "Strip patching", "fig07_strip_patching")


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
