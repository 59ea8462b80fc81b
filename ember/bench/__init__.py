"""Benchmarks run through `ember bench` (the online serving benchmark lives here; the
offline one is bench/offline.py)."""
