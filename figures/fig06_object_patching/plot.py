"""Redraw paper Fig. 6 (and 13, 14): object patching, probability of the clean answer (a) and of the
swapped answer (b) against the patched site, from results/object_patching/."""

import sys
from pathlib import Path

from common.cli import plot_main
from patching.plots import draw_figure

OUTCOMES = {"clean": "P(a): clean answer", "swapped": "P(b): sides swapped"}


def draw(results: Path, out: Path) -> int:
    return draw_figure(results, out, "object_patching", OUTCOMES, "Object patching", "fig06_object_patching")


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
