"""Thin Prefect tasks around sae_core: each takes and returns small references (URIs,
fingerprints, counts), never tensors, and adds only what orchestration needs: a cache policy,
retries, logging and artifacts. The logic they wrap lives in sae_core (stages/ for the pipeline's
stages); the process environment is set by the entry point that imports them (flows/).
"""
