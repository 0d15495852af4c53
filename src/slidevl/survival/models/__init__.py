"""Baseline MIL models; HiLa lives in :mod:`slidevl.survival.hila`, the name → class map in :mod:`slidevl.survival.registry`."""
