"""Redraw paper Fig 4 and 19-30 (position probes on the visual embeddings) from results/probes/<model>/<setting>/:
one PNG per model and setting with a row per orientation, plus summary.md (test accuracy, strip agreement)."""

import sys
from pathlib import Path

from common.cli import plot_main
from probing.plots import draw_figure


def draw(results: Path, out: Path) -> int:
    return draw_figure(results, out, "probes", group=lambda m: "", script="scripts/fig04_probes.sh")


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
