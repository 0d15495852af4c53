"""Survival prediction from whole-slide features: HiLa, MIL baselines, honest cross-validation.

Layout (one idea per module):

- :mod:`.cohort`     clinical CSV (``pathology_id, patient_id, e, t`` or mapped columns and units) → checked patient table
- :mod:`.validate`   the whole input checked before a run, defaults fitted to small cohorts
- :mod:`.labels`     MCAT/Patch-GCN survival bins (whole cohort or training fold only)
- :mod:`.folds`      TCGA ``splits_{k}.csv`` or event-stratified folds (via :mod:`slidevl.splits`)
- :mod:`.data`       patient bags from the feature store, each slide read once per run
- :mod:`.scaling`    per-fold feature standardisation
- :mod:`.loss`       discrete-time NLL, hazards → survival → risk (−ΣS)
- :mod:`.metrics`    C-index (scikit-survival), median-split log-rank test, Kaplan–Meier PNG
- :mod:`.sinkhorn`   batched log-domain Sinkhorn
- :mod:`.models`     mean pooling, ABMIL, TransMIL; :mod:`.hila` prompt bank, OPL, CLP, MCL, HiLa
- :mod:`.registry`   model names → classes (``list_survival_models``, ``build_model``, ``model_from_config``)
- :mod:`.train`      one fold's training/inference through ``accelerate``
- :mod:`.cv`         :func:`~slidevl.survival.cv.run_cv`: the cross-validation run folder
- :mod:`.runfolder`  refuse, overwrite or resume a run folder (``run_state.json``)
- :mod:`.evidence`   per-slide evidence JSON for the viewer
- :mod:`.checkpoint` safetensors + JSON config; :mod:`.predict` one patient from a checkpoint
- :mod:`.report`     rich tables; :mod:`.cli` the ``slidevl survival`` commands
- :mod:`.toy`        a feature-level planted-signal cohort for tests and quick checks
"""
