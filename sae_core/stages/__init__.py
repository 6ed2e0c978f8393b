"""The pipeline's stages as plain functions over the store, one module per stage family.

A stage turns references to committed datasets (and typed configs) into a reference to its own
committed output. Each is idempotent: it names its output folder by a fingerprint of its inputs
and of its code (`locate_*`, a `Location`), returns the committed dataset when it is already
there, and otherwise computes it inside `Store.writing` (data first, manifest last).

| module | stage folders | what it makes |
|---|---|---|
| sample | tokens/ | token contexts of a corpus |
| extract | activations/ | a hook's activations, shard by shard |
| train | sae/ | trained SAEs, alone or in a group reading the data once |
| evaluate | baseline/, probes/, eval/ | an SAE's evaluation and the inputs it shares |
| saebench | letters/, saebench/ | SAEBench's offline evaluations; the first-letter set they need |
| latents | latents/ | the viewer's dataset and explainability |
| report | run_report/, sweep_report/, frontier_report/ | reports with figures |

Adding a stage, the one way:
1. Here, a module (or a function in the family's module) with
   - `CODE`: the tuple of modules whose source decides the output (module objects, imported at
     the top, so the contracts and readers see the dependency);
   - `locate_<output>(inputs...) -> Location`: `located("<folder>", store, *inputs, code=CODE)`;
   - the stage function: `if (manifest := loc.committed(ItsManifest)) is not None: return
     loc.ref(...)`, else compute with sae_core and write inside `Store(store).writing(loc.path)`,
     the manifest last (its typed model in sae_core.storage.manifests).
2. In tasks/, a Prefect task calling it, with `cache_policy=CommittedOutput(locate=...)`.
3. In flows/, a `run_stage(task, ...)` call where the stage belongs in its flow.
Editing any module in a stage's CODE changes its outputs' addresses: they are recomputed.
"""
