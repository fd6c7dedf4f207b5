"""Redraw paper Fig. 8 (and 17, 18): object patching after ablation, probability of the clean answer (a)
and of the swapped answer (b) against the patched LM layer, from results/ablated_patching/."""

import sys
from pathlib import Path

from patching.plots import figure_main

OUTCOMES = {"clean": "P(a): clean answer", "swapped": "P(b): sides swapped"}

if __name__ == "__main__":
    sys.exit(figure_main("ablated_patching", OUTCOMES, "Object patching after ablation", Path(__file__).parent))
