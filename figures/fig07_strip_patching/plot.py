"""Redraw paper Fig. 7, 15, 16: strip patching, probability of the clean answer (a) and of the swapped answer (b)
against the patched site, from results/strip_patching/."""

import argparse
import sys
from pathlib import Path

from patching.plots import draw_figure

OUTCOMES = {"clean": "P(a): clean answer", "swapped": "P(b): sides swapped"}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    sys.exit(draw_figure(args.results, args.out, "strip_patching", OUTCOMES, "Strip patching"))
