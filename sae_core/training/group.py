"""Several SAEs trained from one stream of batches: each batch read once, every SAE stepped on it.

`run_group` trains SAEs that share a data order (`data_order`: batch size, seed, epochs, tokens, device
and ranks); each resumes from its last checkpoint on the store if one exists and checkpoints
every train.checkpoint_every_tokens; each ends bit-identical (CPU) to training it alone.
`run_training` is a group of one. A `BatchSource` is any callable giving an epoch's batches
from a given batch on; `tensor_source` makes one from an in-memory tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from sae_core import stopping
from sae_core.config import SAEConfig, TrainConfig
from sae_core.errors import ConfigError
from sae_core.sae import kernels
from sae_core.sae.ranks import SINGLE, Ranks
from sae_core.storage.store import Store
from sae_core.training.recipe import run_steps, schedule
from sae_core.training.resources import training_bytes
from sae_core.training.trainer import Trainer, init_sae

CHECKPOINT_FILE = "last.safetensors"

# (epoch, start_batch) -> that epoch's [B, d] batches from start_batch on; same args, same batches.
BatchSource = Callable[[int, int], Iterator[torch.Tensor]]


class GroupMember(NamedTuple):
    """One SAE of a group trained on a shared batch stream; checkpoint_dir: store-relative."""

    sae: SAEConfig
    train: TrainConfig
    checkpoint_dir: str | None = None


DataOrder = tuple[int, int, int, int | None, int, str, int, int, int, str | None]


def data_order(train_cfg: TrainConfig) -> DataOrder:
    """What fixes the batches an SAE sees, in order (and where and on how many ranks it trains):
    SAEs that agree on it can share one read of the data (`run_group`)."""
    return (
        train_cfg.batch_size,
        train_cfg.seed,
        train_cfg.epochs,
        train_cfg.tokens,
        train_cfg.data_lanes,
        train_cfg.device,
        train_cfg.world_size,
        train_cfg.nnodes,
        train_cfg.node_rank,
        train_cfg.rendezvous,
    )


def group_by_data_order(points: Sequence[tuple[SAEConfig, TrainConfig]]) -> list[list[int]]:
    """Indices of `points` grouped by `data_order`, groups and members in first-seen order."""
    groups: dict[DataOrder, list[int]] = {}
    for i, (_, train_cfg) in enumerate(points):
        groups.setdefault(data_order(train_cfg), []).append(i)
    return list(groups.values())


def split_by_memory(members: Sequence[GroupMember], d: int, budget: int) -> list[list[int]]:
    """Indices of `members` in consecutive chunks whose training state together (the lower
    bound `resources.training_bytes` of each) stays within `budget` bytes; a member over the
    budget alone gets a chunk of its own. Each chunk is one read of the data."""
    chunks: list[list[int]] = []
    used = budget + 1  # the first member opens a chunk
    for i, member in enumerate(members):
        need = training_bytes(member.sae, d)
        if used + need > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += need
    return chunks


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    """The process's RNG state (and the device's on CUDA)."""
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return [torch.get_rng_state(), *cuda]


def _set_rng_state(state: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _start(
    d: int,
    member: GroupMember,
    store: Store | None,
    init_sample: Callable[[], torch.Tensor],
    device: torch.device | str,
    ranks: Ranks,
    total_steps: int,
) -> Trainer:
    """The member's trainer: from its checkpoint when there is one, else fresh (seeded)."""
    ckpt = _checkpoint_path(member, store)
    if ckpt is not None and store.exists(ckpt):
        trainer = Trainer.from_checkpoint(
            store.read_bytes(ckpt), member.train, device, ranks, total_steps
        )
        if trainer.sae.cfg != member.sae or trainer.sae.d != d:
            raise ConfigError(
                f"checkpoint {ckpt} belongs to another SAE config; delete it to start over"
            )
        if ranks.leader:  # the flow's log_prints sends it to the run's log too
            print(f"training resumes from {ckpt} at {trainer.resumed_from_tokens} tokens")
        return trainer
    torch.manual_seed(member.train.seed)
    scale = schedule(member.train, member.sae.n_latents, total_steps).encoder_init_scale
    sae = init_sae(d, member.sae, init_sample(), member.train.seed, scale)
    return Trainer(sae, member.train, device, ranks, total_steps)


def _checkpoint_path(member: GroupMember, store: Store | None) -> str | None:
    if store is None or not member.checkpoint_dir:
        return None
    return f"{member.checkpoint_dir}/{CHECKPOINT_FILE}"


def _share_buffer(trainers: list[Trainer], batch_size: int) -> None:
    """One [B, n_max] pre-activation buffer (B: the rows each step gets) for the whole group
    instead of one per SAE: they step one after another, so each needs it only during its own
    step. Rows padded as `preacts` pads its own buffer."""
    shapes = [(batch_size, t.sae.n_latents, t.gemm_dtype) for t in trainers]
    size = max(kernels.padded_bytes(*shape) for shape in shapes)
    flat = torch.empty(size, dtype=torch.uint8, device=trainers[0].device)
    for t, shape in zip(trainers, shapes, strict=True):
        t.sae.use_buffer(kernels.padded_rows(*shape, t.device, storage=flat))


def _postfix(trainers: list[Trainer]) -> dict[str, str]:
    """The progress bar's figures: one SAE's nmse and dead fraction, or every SAE's nmse."""
    last = [t.state.history[-1] for t in trainers if t.state.history]
    if len(trainers) == 1 and last:
        return {"nmse": f"{last[0]['nmse']:.4f}", "dead": f"{last[0]['dead_fraction']:.3f}"}
    return {"nmse": " ".join(f"{r['nmse']:.3f}" for r in last)}


def run_group(
    d: int,
    members: Sequence[GroupMember],
    source: BatchSource,
    steps_per_epoch: int,
    init_sample: Callable[[], torch.Tensor],
    store: Store | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stop_after_steps: int | None = None,
    ranks: Ranks = SINGLE,
) -> list[Trainer]:
    """Train several SAEs from one stream: each batch is read once and every SAE steps on it, one
    after another. The members must share `data_order`.

    Each SAE keeps what a lone run has: its seeded start, its own RNG state (put in place for
    its steps), optimiser, checkpoints under its checkpoint_dir at its own cadence; so each
    ends exactly as `run_training` alone would leave it (bit-identical on CPU), and a lone run
    can resume from a checkpoint the group wrote, or the other way round. Each resumes from its
    own checkpoint: the stream restarts at the earliest cursor and an SAE already past a batch
    skips it. init_sample() -> [N, d] raw activations, called once if any SAE starts fresh.
    stop_after_steps: stop after that many batches of the stream (each SAE checkpointed at
    its cadence only), a deliberate interruption for tests. Data parallel: `source` yields
    this rank's slices of the global batches; every rank reads the checkpoints, rank 0 alone
    writes them and shows progress.
    """
    if len({data_order(m.train) for m in members}) != 1:
        raise ConfigError(
            "train: a group's SAEs must share train.batch_size, seed, epochs, tokens, data_lanes, "
            "device, world_size and the nodes; "
            "group them with group_by_data_order"
        )
    sample: list[torch.Tensor] = []

    def shared_sample() -> torch.Tensor:
        if not sample:
            sample.append(init_sample())
        return sample[0]

    device = torch.device(device)
    train_cfg = members[0].train
    total_steps = run_steps(train_cfg, steps_per_epoch)
    epochs = -(-total_steps // steps_per_epoch)
    trainers, rngs = [], []
    for member in members:
        trainers.append(_start(d, member, store, shared_sample, device, ranks, total_steps))
        rngs.append(_rng_state(device))
    sample.clear()
    _share_buffer(trainers, train_cfg.batch_size // ranks.world_size)  # this rank's rows
    ckpts = [_checkpoint_path(m, store) if ranks.leader else None for m in members]
    states = [t.state for t in trainers]
    first = min(st.epoch * steps_per_epoch + st.batch_in_epoch for st in states)
    desc = "train sae" if len(members) == 1 else f"train {len(members)} saes"
    with tqdm(
        total=total_steps,
        initial=first,
        desc=desc,
        unit="step",
        disable=not progress or not ranks.leader,
    ) as bar:
        for epoch in range(min(st.epoch for st in states), epochs):
            # The last pass of a train.tokens run stops where the run's steps end.
            end = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            due = [st.batch_in_epoch for st in states if st.epoch == epoch]
            start = min(due, default=end)
            batches = source(epoch, start) if start < end else iter(())
            for batch_in_epoch, x in zip(range(start, end), batches, strict=False):
                stopping.check()  # between steps: the last checkpoint is where a re-run resumes
                for i, (trainer, st) in enumerate(zip(trainers, states, strict=True)):
                    if (st.epoch, st.batch_in_epoch) != (epoch, batch_in_epoch):
                        continue  # resumed past this batch
                    _set_rng_state(rngs[i], device)
                    before = st.tokens_seen
                    trainer.step(x)
                    every = trainer.cfg.checkpoint_every_tokens
                    if ckpts[i] is not None and st.tokens_seen // every > before // every:
                        store.write_bytes(ckpts[i], trainer.checkpoint_bytes())
                    rngs[i] = _rng_state(device)
                bar.update(1)
                bar.set_postfix(_postfix(trainers), refresh=False)
                if (
                    stop_after_steps is not None
                    and epoch * steps_per_epoch + batch_in_epoch + 1 >= stop_after_steps
                ):
                    for trainer in trainers:
                        trainer.sae.free_buffer()
                    return trainers
            for st in states:
                if st.epoch == epoch:
                    st.epoch += 1
                    st.batch_in_epoch = 0
    for i, trainer in enumerate(trainers):
        if ckpts[i] is not None:
            _set_rng_state(rngs[i], device)
            store.write_bytes(ckpts[i], trainer.checkpoint_bytes())
        trainer.sae.free_buffer()
    # BatchTopK thresholds tracked on the training weights, shipped on others: rows to calibrate.
    calibrated = [t for t in trainers if t.sae.cfg.batch_topk and t.ships_other_weights]
    if calibrated:
        rows = init_sample()  # every rank calls it: data parallel, it is a broadcast
        for trainer in calibrated:
            trainer.threshold_rows = rows
    return trainers


def run_training(
    d: int,
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    source: BatchSource,
    steps_per_epoch: int,
    init_sample: Callable[[], torch.Tensor],
    store: Store | None = None,
    checkpoint_dir: str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stop_after_steps: int | None = None,
    ranks: Ranks = SINGLE,
) -> Trainer:
    """Train one SAE from `source` (a group of one, `run_group`), resuming from `checkpoint_dir`
    on `store` when a checkpoint is there; checkpoints every train.checkpoint_every_tokens.
    Data parallel: `source` yields this rank's slices of the global batches."""
    member = GroupMember(sae_cfg, train_cfg, checkpoint_dir)
    [trainer] = run_group(
        d,
        [member],
        source,
        steps_per_epoch,
        init_sample,
        store,
        device,
        progress,
        stop_after_steps,
        ranks,
    )
    return trainer


def tensor_source(
    data: torch.Tensor, batch_size: int, seed: int, ranks: Ranks = SINGLE
) -> BatchSource:
    """Shuffled in-memory batches of data: [N, d]; the order depends only on (seed, epoch).
    Data parallel: each rank gets its `ranks.rows` of every batch."""
    take = ranks.rows(batch_size)

    def source(epoch: int, start_batch: int) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(data.shape[0], generator=g)
        for b in range(start_batch, data.shape[0] // batch_size):
            yield data[perm[b * batch_size : (b + 1) * batch_size][take]]

    return source
