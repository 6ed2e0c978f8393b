"""The registered model's code, logged with MLflow's models-from-code: nothing is pickled.

MLflow copies this file into the model and runs it on `mlflow.pyfunc.load_model`; the weights
come from the model's safetensors artifact and the SAE code from the model's own copy of the
sae_core modules inference imports (its `code` folder, tasks/model_code.py). predict: float32
activations [B, d] -> dense latent codes [B, n] (the k active latents per row hold their values,
the rest are 0). A stored activation shard becomes that input with
`sae_core.storage.layout.read_activations(path_or_file)`, shipped in the same folder.
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WEIGHTS_ARTIFACT = "sae"  # the key of the safetensors file in the model's artifacts


class SAELatents(PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        import sae_core
        from sae_core.sae import load_sae_bytes

        # Running the model's own copy of sae_core (its code/ folder, beside MLmodel): stock
        # torch ops (the same codes to rounding), since building the C++ kernels for that copy
        # of their sources takes a minute or more and a compiler on first predict. A user who
        # sets SAEFLOW_NATIVE_KERNELS=1 gets them. A process with saeflow installed (the run
        # registering the model validates it in process) keeps its own kernels.
        if (Path(sae_core.__file__).parents[1].parent / "MLmodel").is_file():
            os.environ.setdefault("SAEFLOW_NATIVE_KERNELS", "0")

        self.sae = load_sae_bytes(Path(context.artifacts[WEIGHTS_ARTIFACT]).read_bytes()).eval()

    # np.ndarray is a hint MLflow takes without inferring a schema from it: the logged tensor
    # signature stays the one that is enforced.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32))
        codes = self.sae.encode(x)
        dense = torch.zeros(x.shape[0], self.sae.n_latents, dtype=codes.vals.dtype)
        return dense.scatter_(1, codes.idx, codes.vals).numpy()


mlflow.models.set_model(SAELatents())
