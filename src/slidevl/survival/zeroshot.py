"""Zero-shot prognosis: a risk score from prompt alignment alone, with no survival training.

HiLa's premise is that its prompt bank describes prognostic morphology in the space
where the patches live. If that holds, the prompts should rank patients before any
model is trained: each patch is matched to the risk levels' prompts (softmax over
levels of the model's scaled cosine to each level's mean prompt embedding), the
patch's risk is its expected level counted from the lowest-risk end, and a patient's
risk is the mean over its patches. The C-index of that score against the outcomes is
the check; a bank that means nothing in the space scores about 0.5.

It needs an aligned text tower (``conch:PATH``, ``openclip:...``): a sentence encoder's
space has no relation to the patch features without a trained bridge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slidevl.features.encoders.text import class_embeddings, class_probabilities
from slidevl.survival.hila.prompts import PromptError, load_prompt_bank


def patch_risk(image_embeddings: np.ndarray, levels: np.ndarray, logit_scale: float) -> np.ndarray:
    """Expected risk level of each patch: 0 = lowest-risk level ... L-1 = highest (levels run high to low)."""
    weights = np.arange(len(levels) - 1, -1, -1, dtype=np.float64)
    return class_probabilities(image_embeddings, levels, logit_scale).astype(np.float64) @ weights


def zero_shot_prognosis(job: str | Path, clinical: str | Path, text_encoder: str, prompts: str = "synthetic",
                        *, encoder: str | None = None) -> dict[str, Any]:
    """Per-patient zero-shot risk and its C-index over the cohort (see module docstring)."""
    from slidevl.features.encoders.text import get_text_encoder
    from slidevl.features.store import FeatureStore
    from slidevl.survival.cohort import load_cohort
    from slidevl.survival.metrics import c_index

    text = get_text_encoder(text_encoder)
    if not getattr(text, "aligned", False):
        raise PromptError(
            f"zero-shot prognosis needs the text tower of the model that made the features (conch:PATH or "
            f"openclip:...), not {text_encoder!r}, whose space is unrelated to the patch features"
        )
    store = FeatureStore(job, encoder)
    cohort = load_cohort(clinical, store.__contains__, skip_missing=True)
    levels = class_embeddings(text, load_prompt_bank(prompts).patch)
    risks = {}
    for patient_id, row in cohort.patients.iterrows():
        per_patch = []
        for slide_id in row["slides"]:
            features = store.load(slide_id)
            text.check_features(features.attrs, str(store.path(slide_id)))
            per_patch.append(patch_risk(text.image_embeddings(features.patch_features), levels, text.logit_scale))
        risks[str(patient_id)] = float(np.concatenate(per_patch).mean())
    ids = list(risks)
    t = cohort.patients.loc[ids, "t"].to_numpy(float)
    e = cohort.patients.loc[ids, "e"].to_numpy(int)
    return {
        "c_index": c_index(t, e, np.array([risks[i] for i in ids])),
        "n_patients": len(ids),
        "n_events": int(e.sum()),
        "text_space": text.space,
        "prompts": prompts,
        "risk": risks,
    }
