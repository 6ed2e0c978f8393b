"""Training SAEs: the trainer (Adam, AuxK bookkeeping, the unit-norm step, checkpoints, exact
resume), groups of SAEs trained from one read of the data, data-parallel workers (torchrun),
what a run needs of the machine, and the preflight checks that fail bad input in seconds.

May import: sae, data, storage and the leaves.
"""
