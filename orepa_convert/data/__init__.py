"""Datasets orepa_convert generates on disk (the demo, the tests and the studies run offline on them)."""
