"""Redraw paper Fig. 7 (and 15, 16): strip patching, probability of the clean answer (a) and of the
swapped answer (b) against the patched site, from results/strip_patching/."""

import sys
from pathlib import Path

from patching.plots import figure_main

OUTCOMES = {"clean": "P(a): clean answer", "swapped": "P(b): sides swapped"}

if __name__ == "__main__":
    sys.exit(figure_main("strip_patching", OUTCOMES, "Strip patching", Path(__file__).parent))
