"""What each latent means: statistics streamed over the eval activations (top and random
contexts, histograms), n-gram explanations and their scores, the logit lens, the pages written
for the viewer, and the viewer itself (a static site or a local server).

May import: evaluation (its metrics), sae, data, storage and the leaves.
"""
