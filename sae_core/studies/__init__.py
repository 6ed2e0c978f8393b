"""Studies over many SAEs: the sweep's grid and the scaling-law fit L(n, k), the expander
storage-fidelity frontier, the SAE kinds compared, and their reports and plots.

May import: evaluation, sae, storage and the leaves.
"""
