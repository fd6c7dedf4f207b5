"""Redraw paper Fig 31 (2 x 2) and Fig 32 (3 x 3): row, column and cell probes on shapes grids, from
results/grid_probes/<model>/<setting>/: one PNG per model, setting and grid size, a row per probe, plus summary.md."""

import sys
from pathlib import Path

from common.cli import plot_main
from probing.plots import draw_figure


def draw(results: Path, out: Path) -> int:
    return draw_figure(results, out, "grid_probes", group=lambda m: m["arrangement"],
                       script="scripts/fig31_grid_probes.sh")


if __name__ == "__main__":
    sys.exit(plot_main(draw, __doc__, __file__))
