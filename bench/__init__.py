"""The performance benchmark's measurements (``bench/perf_bench.py`` runs them).

Each measurement runs our code side by side with a baseline in the same process tree
(a bare PyTorch loop, the model's consumption rate, the hardware's peak) and returns a
plain dict of numbers that the script prints and writes as JSON.
"""
