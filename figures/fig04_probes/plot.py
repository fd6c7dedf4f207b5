"""Redraw paper Fig 4 and 19-30 (position probes on the visual embeddings) from results/probes/<model>/<setting>/:
one PNG per model and setting with a row per orientation, plus summary.md (test accuracy, strip agreement)."""

import argparse
import sys
from pathlib import Path

from probing.plots import draw_figure

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    sys.exit(draw_figure(args.results, args.out, "probes", group=lambda m: "", script="scripts/fig04_probes.sh"))
