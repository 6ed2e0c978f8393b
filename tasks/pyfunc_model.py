"""The registered model's code, logged with MLflow's models-from-code: nothing is pickled.

MLflow copies this file into the model and runs it on `mlflow.pyfunc.load_model`; the weights
come from the model's safetensors artifact and the SAE code from the model's own copy of
sae_core (its `code` folder). predict: float32 activations [B, d] -> dense latent codes [B, n]
(the k active latents per row hold their values, the rest are 0).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

WEIGHTS_ARTIFACT = "sae"  # the key of the safetensors file in the model's artifacts


class SAELatents(PythonModel):
    # No type hints on these two: MLflow would read them as a competing signature.
    def load_context(self, context):
        from pathlib import Path

        from sae_core.sae import load_sae_bytes

        self.sae = load_sae_bytes(Path(context.artifacts[WEIGHTS_ARTIFACT]).read_bytes()).eval()

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        x = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32))
        codes = self.sae.encode(x)
        dense = torch.zeros(x.shape[0], self.sae.n_latents, dtype=codes.vals.dtype)
        return dense.scatter_(1, codes.idx, codes.vals).numpy()


mlflow.models.set_model(SAELatents())
