"""Triton kernels for the TopK SAE's sparse step on CUDA (and under TRITON_INTERPRET=1 on CPU,
which is how the default suite tests them).

One module per kernel family, each kernel beside its launcher, whose docstring states shapes,
cost and memory traffic and which checks its arguments (`checks`):

- `gather`: the decoder's gather-sum over the K selected latents (also the encoder's input
  gradient) and its gradient into the activations (dot products with the selected rows);
- `latent_sums`: the weight gradients (decoder, encoder, b_enc, the expander's values) as
  per-latent sums over a stable sort of the selections: deterministic, no atomics;
- `compact`: the expander's compact decoder (`degree` values per latent at fixed columns);
- `ops`: the autograd functions `sae_core.sae.kernels` and the expander call on this path.

Every kernel accumulates in float32 and accepts float32, bfloat16 or float16 inputs. Against
the float32 dense reference: float32 inputs agree to float32 rounding (tested at rtol 1e-4),
bfloat16 inputs (weights, activations and gradients rounded to bf16) to within 2% of the
output's largest magnitude (each rounding is <= 2^-9 relative; tested in tests/sae/triton/).

The modules import each other relatively and nothing else from saeflow (only torch and
triton), so `deployments/gpu_check.py` loads them on a GPU node without saeflow's
dependencies. Nothing here imports triton until a module below is imported.
"""

from pathlib import Path

# The kernels' files, hashed into the training stage's code fingerprint (`code_fingerprint`
# reads a module's SOURCES) without importing triton.
SOURCES = tuple(sorted(p for p in Path(__file__).parent.glob("*.py") if p.name != "__init__.py"))
