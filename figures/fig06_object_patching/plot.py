"""Redraw paper Fig. 6 (and 13, 14): object patching, probability of the clean answer (a) and of the
swapped answer (b) against the patched site, from results/object_patching/."""

import sys
from pathlib import Path

from patching.plots import figure_main

OUTCOMES = {"clean": "P(a): clean answer", "swapped": "P(b): sides swapped"}

if __name__ == "__main__":
    sys.exit(figure_main("object_patching", OUTCOMES, "Object patching", Path(__file__).parent))
