"""Benchmarks: scripts that measure fedsite (``python -m simulations.bench.<name>``), not part of what users import.

Each module's first lines say what it measures and how to run it; figures from earlier runs are in its
docstring or in the RESULTS files it names. No product module imports them (``tests/test_layers.py``).
"""
