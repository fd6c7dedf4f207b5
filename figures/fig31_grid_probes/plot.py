"""Redraw paper Fig 31 (2 x 2) and Fig 32 (3 x 3): row, column and cell probes on shapes grids, from
results/grid_probes/<model>/<setting>/: one PNG per model, setting and grid size, a row per probe, plus summary.md."""

import argparse
import sys
from pathlib import Path

from probing.plots import draw_figure

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    sys.exit(draw_figure(args.results, args.out, "grid_probes", group=lambda m: m["arrangement"],
                         script="scripts/fig31_grid_probes.sh"))
