"""The `mlserver` target's runtime for a model with a skops form: MLServer's scikit-learn runtime, but the model is
built by skops from `parameters.uri` (model.skops), so nothing in the file runs as code. mlserver_sklearn 1.7.1
reads only `model.joblib`, `model.pickle` or `model.pkl`, with `joblib.load`, which unpickles."""
from __future__ import annotations

import skops.io
from mlserver.utils import get_model_uri
from mlserver_sklearn import SKLearnModel

# model-settings.json's `parameters.extra` key: the types skops builds besides its defaults, as the signed
# manifest lists them.
TRUSTED_TYPES = "skops_trusted_types"


class SkopsModel(SKLearnModel):
    """Predicts (`predict`, `predict_proba`, `transform`) as `SKLearnModel` does, on the model skops built."""

    async def load(self) -> bool:
        extra = self.settings.parameters.extra if self.settings.parameters else None
        trusted = list((extra or {}).get(TRUSTED_TYPES, []))
        self._model = skops.io.load(await get_model_uri(self._settings), trusted=trusted)
        return True
