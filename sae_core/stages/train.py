"""Stage `sae`: SAEs trained on an activations dataset (sae_core.training), one or a group
sharing one read of the data, each committed at the address a lone run would have."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack

from sae_core.config import TRAIN_EXECUTION_FIELDS, SAEConfig, TrainConfig
from sae_core.device import device_memory, pick_device, state_copies
from sae_core.sae import (
    base,
    expander,
    fused_loss,
    kernels,
    matryoshka,
    native,
    normalize,
    ranks,
    safetensors_io,
    topk,
    transcoder,
    unit_adam,
)
from sae_core.sae import triton as triton_kernels
from sae_core.stages.location import Location, located
from sae_core.storage import faults, lanes, loader
from sae_core.storage.housekeeping import CHECKPOINTS
from sae_core.storage.manifests import ActivationsManifest, SaeManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from sae_core.training import ddp, group, trainer
from sae_core.training import train as training
from sae_core.training.group import GroupMember, split_by_memory

COMMIT_WAIT_S = 120.0  # how long a node other than 0 waits for node 0's commit after training

# One SAE or a group: the same loop, the same result. The loader and its lanes' plan fix the
# batch order, ranks the reductions over the global batch.
CODE = (
    training,
    group,
    trainer,
    loader,
    lanes,
    ranks,
    base,
    topk,
    expander,
    matryoshka,
    transcoder,
    kernels,
    fused_loss,
    unit_adam,
    native,
    triton_kernels,  # the package; its SOURCES are the kernels (importing it needs no triton)
    normalize,
    safetensors_io,  # the SAE file's bytes
)


def locate_sae(
    acts: DatasetRef, sae: SAEConfig, train: TrainConfig, acts_out: DatasetRef | None = None
) -> Location:
    """acts_out: a transcoder's target dataset (an SAE's address does not name it)."""
    target = () if acts_out is None else (acts_out.fingerprint,)
    return located(
        "sae",
        acts.store,
        acts.fingerprint,
        *target,
        sae,
        train.model_dump(exclude=TRAIN_EXECUTION_FIELDS),
        code=CODE,
    )


def checkpoint_dir(sae: Location) -> str:
    """Where training an SAE keeps its checkpoint until the SAE is committed: outside its
    dataset folder, which an unfinished attempt's clearing empties."""
    return f"{CHECKPOINTS}/{sae.fingerprint}"


def remove_sae(
    acts: DatasetRef, sae: SAEConfig, train: TrainConfig, acts_out: DatasetRef | None = None
) -> None:
    """Delete the SAE and its checkpoints: the next run trains it from the start."""
    loc = locate_sae(acts, sae, train, acts_out)
    loc.remove()
    Store(loc.store).rm(checkpoint_dir(loc))


def train_sae(
    acts: DatasetRef,
    sae: SAEConfig,
    train: TrainConfig,
    progress: bool = True,
    acts_out: DatasetRef | None = None,
) -> DatasetRef:
    """acts_out: a transcoder's target, the dataset of model.hook_out paired with `acts`."""
    return train_sae_group(acts, [(sae, train)], progress, acts_out)[0]


def train_sae_group(
    acts: DatasetRef,
    points: Sequence[tuple[SAEConfig, TrainConfig]],
    progress: bool = True,
    acts_out: DatasetRef | None = None,
) -> list[DatasetRef]:
    """One committed SAE per (sae, train) point, each at its own `locate_sae` location (the one
    a lone `train_sae` uses). Those not committed yet train together from one read of the data
    (they must share `train.data_order`), each resuming from its checkpoint, then each commits.
    A group whose training state would take more than half the device's memory trains in
    chunks that fit, one read of the data each.
    """
    locs = [locate_sae(acts, sae, train, acts_out) for sae, train in points]
    manifests = {loc: loc.committed(SaeManifest) for loc in locs}  # one per distinct location
    configs = dict(zip(locs, points, strict=True))
    todo = [loc for loc, manifest in manifests.items() if manifest is None]
    members = [GroupMember(*configs[loc], checkpoint_dir=checkpoint_dir(loc)) for loc in todo]
    if todo:
        # faults.open_store: SAEFLOW_INJECT_FAULT can fail checkpoint writes, to test re-runs.
        store = faults.open_store(acts.store)
        train0 = members[0].train
        device = pick_device(train0.device)
        budget = device_memory(device) // (2 * state_copies(device, train0.world_size))
        width = acts.manifest(ActivationsManifest).width
        for chunk in split_by_memory(members, width, budget):
            chunk_locs = [todo[i] for i in chunk]
            chunk_members = [members[i] for i in chunk]
            manifests |= _train_and_commit(
                acts, store, chunk_locs, chunk_members, progress, acts_out
            )
    return [loc.ref(manifests[loc].tokens_seen) for loc in locs]


def _train_and_commit(
    acts: DatasetRef,
    store: Store,
    locs: list[Location],
    members: list[GroupMember],
    progress: bool,
    acts_out: DatasetRef | None = None,
) -> dict[Location, SaeManifest]:
    """Train `members` as one group and commit each at its location; their manifests. The
    trainers are dropped on return, before another chunk starts. With several ranks
    torchrun workers train the group and rank 0 fills the folders; on several nodes node 0
    commits and the others wait for its commit."""
    if members[0].train.node_rank > 0:
        ddp.train_data_parallel(acts, members, [loc.path for loc in locs], progress, acts_out)
        return _committed_by_node_0(locs)
    with ExitStack() as stack:  # every folder committed on a normal exit, none on an error
        writers = [stack.enter_context(store.writing(loc.path)) for loc in locs]
        if members[0].train.ranks > 1:
            datasets = [w.dataset for w in writers]
            made = ddp.train_data_parallel(acts, members, datasets, progress, acts_out)
            for writer, manifest in zip(writers, made, strict=True):
                writer.manifest = manifest  # rank 0 reported it
        else:
            trainers = training.train_group(acts, members, store, progress, acts_out=acts_out)
            made = [
                training.write_trained(w, acts, t, acts_out).manifest
                for w, t in zip(writers, trainers, strict=True)
            ]
    # Committed: an SAE is found at its address from now on and never trains again, so its
    # checkpoint (needed only before the commit, to resume) goes. A kill between the two
    # leaves it for `saeflow gc`.
    for loc in locs:
        store.rm(checkpoint_dir(loc))
    return dict(zip(locs, made, strict=True))


def _committed_by_node_0(
    locs: list[Location], wait_s: float = COMMIT_WAIT_S
) -> dict[Location, SaeManifest]:
    """The manifests node 0 commits once every rank has ended (its parent commits right after
    its workers end; this node's ended with them)."""
    deadline = time.monotonic() + wait_s
    while True:
        done = {loc: m for loc in locs if (m := loc.committed(SaeManifest)) is not None}
        if len(done) == len(locs):
            return done
        if time.monotonic() > deadline:
            missing = ", ".join(loc.path for loc in locs if loc not in done)
            raise ddp.DataParallelFailed(
                f"training ended but node 0 committed no SAE at {missing} within {wait_s:.0f} s; "
                "see node 0's log, fix the cause and run every node again"
            )
        time.sleep(0.5)
