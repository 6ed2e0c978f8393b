"""EleutherAI sparsify's TopK SAE trained on a stored activations dataset, as its `Trainer` trains
one with its defaults, on the pipeline's own batches in the pipeline's order.

Run by a Python that has `eai-sparsify` (a scratch venv, never a project dependency) with this
repository on PYTHONPATH: `python -m sae_core.bench.sparsify_peer '{JSON}'`, the JSON holding
activations (URI), n_latents, k, batch_size, budgets (tokens), seed and out (a folder).

What its Trainer does per step, with loss_fn=fvu, optimizer=signum, auxk_alpha=0 (its
defaults): on the first batch b_dec is set to the batch mean; every step renormalises the
decoder rows, takes the FVU loss, removes the decoder gradient parallel to each row and steps
SignSGD (lr 5e-3 / sqrt(n / 2^14)) under a schedule-free wrapper (momentum 0.95). At each
budget the schedule-free average of the weights (its `eval()` weights, what its checkpoints
save) is written to `out/sparsify-<tokens>.safetensors`, and `out/log.json` lists them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from sae_core.storage.loader import iter_batches
from sae_core.storage.manifests import ActivationsManifest
from sae_core.storage.refs import committed_dataset


def main(spec: dict) -> None:
    from safetensors.torch import save_file
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    acts = committed_dataset(spec["activations"], "activations")
    if acts is None:
        raise SystemExit(f"{spec['activations']}: not a committed activations dataset")
    manifest = acts.manifest(ActivationsManifest)
    rows, d = manifest.splits["train"].rows, manifest.width
    B, seed, n = spec["batch_size"], spec["seed"], spec["n_latents"]
    budgets = sorted(spec["budgets"])
    out = Path(spec["out"])

    torch.manual_seed(seed)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=spec["k"]), torch.device("cpu"))
    lr = 5e-3 / (n / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    fired = torch.zeros(n, dtype=torch.bool)
    snapshots, step, tokens, seconds = [], 0, 0, 0.0
    epoch = 0
    while budgets:
        for x in iter_batches(acts, "train", B, seed, epoch, 0):
            start = time.perf_counter()
            if step == 0:
                sae.b_dec.data = x.mean(0)
            sae.set_decoder_norm_to_unit_norm()
            result = sae(x)
            result.fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            fired[result.latent_indices[result.latent_acts > 0]] = True
            seconds += time.perf_counter() - start
            step, tokens = step + 1, tokens + B
            if tokens + B > budgets[0]:  # the next batch would pass this budget
                opt.eval()
                name = f"sparsify-{budgets[0]}.safetensors"
                save_file({k: v.detach().clone() for k, v in sae.state_dict().items()}, out / name)
                opt.train()
                snapshots.append(
                    {
                        "budget": budgets.pop(0),
                        "tokens": tokens,
                        "steps": step,
                        "file": name,
                        "seconds": seconds,
                        "dead_fraction": float((~fired).float().mean()),
                    }
                )
                print(json.dumps(snapshots[-1]), flush=True)
                if not budgets:
                    break
        epoch += 1
        if epoch * rows > 10**9:
            raise SystemExit("no progress through the data")
    (out / "log.json").write_text(json.dumps({"lr": lr, "snapshots": snapshots}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
