"""loralab: train, evaluate and compare low-rank adaptation methods, and reproduce their papers' tables."""

__version__ = "0.1.0"
