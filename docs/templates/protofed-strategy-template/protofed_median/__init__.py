"""protofed_median: a strategy plugin for protofed (see strategy.py)."""
