"""Baseline MIL models and the model registry (:data:`.base.SURVIVAL_MODELS`); HiLa lives in :mod:`slidevl.survival.hila`."""
