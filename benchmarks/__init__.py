"""`make bench`: the four figures of BENCHMARKS.md, each measured side by side in one run.

One module per figure (`serving`, `overhead`, `rebuilds`, `spinup`); `run` measures them and writes the
report. Absolute times drift on a shared machine, so every comparison alternates its variants round by
round and the report quotes medians and ratios.
"""
