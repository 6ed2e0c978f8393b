"""saeflow's science and data plane, importable and testable without any orchestrator.

It never imports prefect, mlflow or great_expectations, and importing it changes nothing in
the process. Its rooms, lowest first (a room imports only from the rooms below it; the
contracts in pyproject.toml check this, and docs/ARCHITECTURE.md is the map):

- errors, env, config, device: leaves every room may use;
- storage/: the store, references, fingerprints, manifests, the Parquet layout and loader;
- data/: demo assets, tokens, models and hooks, activation extraction, validation summaries;
- sae/: the SAE kinds, normalisation, kernels (csrc/ for the C++), export formats;
- training/: the trainer, groups, data parallelism, preflight checks;
- evaluation/: metrics, splicing, baselines, ablation, probes, the promotion gate;
- latents/: latent statistics, pages, explanations, logit lens, the viewer;
- studies/: sweep, scaling-law fit, frontier, reports, plots;
- bench/: the benchmarks (scripts that print figures);
- stages/: the pipeline's stages over the store, one module per stage family.
"""
