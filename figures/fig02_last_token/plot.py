"""Redraw paper Fig. 2 (and 11, 12): last-token patching, probability of the clean answer, of the ordering
outcome and of the value outcome against the patched LM layer, from results/last_token/."""

import sys
from pathlib import Path

from patching.plots import figure_main

OUTCOMES = {"clean": "P(a): clean answer", "ordering": "P(b): ordering transferred",
            "value": "P(e): value transferred"}

if __name__ == "__main__":
    sys.exit(figure_main("last_token", OUTCOMES, "Last-token patching", Path(__file__).parent))
