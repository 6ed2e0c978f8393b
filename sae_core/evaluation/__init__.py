"""Judging a trained SAE: the metrics (each defined once), splicing the reconstruction into the
model, the eval set's baseline, ablation sparsity, probes on labelled tokens and documents, and
the promotion gate that compares a challenger with the champion.

May import: sae, data, storage and the leaves.
"""
