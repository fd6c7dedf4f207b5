"""Behavioural accuracy (paper Table 1 and Table 4): the experiment every other one is read against."""
