"""Redraw paper Fig. 2 (and 11, 12): last-token patching, probability of the clean answer, of the ordering
outcome and of the value outcome against the patched LM layer, from results/last_token/."""

import argparse
import sys
from pathlib import Path

from patching.plots import draw_figure

OUTCOMES = {"clean": "P(a): clean answer", "ordering": "P(b): ordering transferred",
            "value": "P(e): value transferred"}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    sys.exit(draw_figure(args.results, args.out, "last_token", OUTCOMES, "Last-token patching"))
