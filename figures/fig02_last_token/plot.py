"""Redraw paper Fig. 2 (and 11, 12): last-token patching, probability of the clean answer, of the ordering
outcome and of the value outcome against the patched LM layer, from results/last_token/."""

import sys
from pathlib import Path

from common.cli import plot_main
from patching.plots import draw_figure

OUTCOMES = {"clean": "P(a): clean answer", "ordering": "P(b): ordering transferred",
            "value": "P(e): value transferred"}


def draw(results: Path, out: Path) -> int:
    return draw_figure(results, out, "last_token", OUTCOMES, "Last-token patching", "fig02_last_token")


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
