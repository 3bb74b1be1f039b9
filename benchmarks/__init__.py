"""Benchmarks of orepa_convert (not part of the installed package)."""
