"""Training SAEs on a committed activations dataset and writing them to the store.

Layers, outermost first:
- `train_sae(acts, sae_cfg, train_cfg, writer, checkpoint_dir)`: reads the stored activations,
  trains, writes `sae.safetensors`, `config.json`, `history.json` and the manifest
  (`write_trained`). `train_group(acts, members, store)`: several SAEs that share the data
  order from one read of the data.
- `sae_core.training.group.run_group`: any batch source, checkpoints and resume.
- `sae_core.training.trainer.Trainer.step(x_raw)`: one optimiser step on a [B, d] batch.

Data parallel (`ranks`, launched by `sae_core.training.ddp`): each rank steps on its slice of
every global batch; the state (weights, Adam, counters, data cursor in global batches) is the
same on every rank: rank 0 writes the checkpoints, every rank resumes from them, at any world
size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from sae_core.config import TRANSCODER_KINDS, SAEConfig, TrainConfig
from sae_core.device import device_name, pick_device
from sae_core.errors import ConfigError
from sae_core.sae import WEIGHTS_FILE, MatryoshkaSAE, SparseAutoencoder, storage_report
from sae_core.sae.ranks import SINGLE, Ranks
from sae_core.storage.loader import ReadTally, iter_batches
from sae_core.storage.manifests import ActivationsManifest, SaeManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import DatasetWriter, Store
from sae_core.training.group import GroupMember, run_group
from sae_core.training.trainer import Trainer

INIT_SAMPLE_TOKENS = 32_768  # the released code's sample size for the geometric median


@dataclass
class TrainResult:
    sae: SparseAutoencoder
    history: list[dict[str, float]]
    manifest: SaeManifest

    @property
    def resumed_from_tokens(self) -> int:
        """0 for a fresh run."""
        return self.manifest.resumed_from_tokens


def sae_manifest(
    trainer: Trainer, fingerprint: str, acts: DatasetRef, acts_out: DatasetRef | None = None
) -> SaeManifest:
    """The trained SAE's manifest: where it came from and its final figures. final_nmse: mean
    over the last 5% of steps. acts_out: a transcoder's target dataset."""
    sae, st = trainer.sae, trainer.state
    tail = st.history[-max(1, len(st.history) // 20) :]
    window = min(sae.cfg.dead_window_tokens, max(st.tokens_seen, 1))
    return SaeManifest(
        schema_version=1,
        fingerprint=fingerprint,
        activations=acts.uri,
        **({"activations_out": acts_out.uri} if acts_out is not None else {}),
        sae_kind=sae.cfg.kind,
        d=sae.d,
        n=sae.n_latents,
        k=sae.k,
        k_aux=sae.k_aux,
        normalization=sae.norm.to_json(),
        tokens_seen=st.tokens_seen,
        steps=st.step,
        lr=trainer.lr,
        recipe=trainer.schedule.recipe,
        lr_warmup_steps=trainer.schedule.warmup_steps,
        lr_decay=trainer.schedule.decay,
        optimizer=trainer.schedule.optimizer,
        final_nmse=sum(r["nmse"] for r in tail) / len(tail) if tail else float("nan"),
        # AuxK's criterion (silent for dead_window_tokens) and, for runs shorter than the
        # window, the share of latents silent over the whole run.
        dead_fraction=trainer.dead.fraction(),
        dead_fraction_run=trainer.dead.fraction(window),
        weights="ema" if trainer.ema is not None else "last",
        storage=storage_report(sae),
        resumed_from_tokens=trainer.resumed_from_tokens,
        device=device_name(trainer.device),
        gemm_dtype=str(trainer.gemm_dtype).removeprefix("torch."),
        # Set only for BatchTopK (and Matryoshka) SAEs: the others' manifests do not have the fields.
        **({"batch_topk_threshold": float(sae.threshold)} if sae.cfg.batch_topk else {}),
        **({"matryoshka_prefixes": list(sae.sizes)} if isinstance(sae, MatryoshkaSAE) else {}),
    )


def train_group(
    acts: DatasetRef,
    members: Sequence[GroupMember],
    store: Store,
    progress: bool = True,
    ranks: Ranks = SINGLE,
    device: torch.device | None = None,
    reads: ReadTally | None = None,
    acts_out: DatasetRef | None = None,
) -> list[Trainer]:
    """Train the members (sharing `data_order`) on the `train` split of a committed activations
    dataset, reading it once per epoch for all of them; checkpoints go to `store`.

    Each member's checkpoint_dir is a store-relative folder outside the dataset folder (it
    survives the clearing of unfinished attempts), e.g. `checkpoints/<fingerprint>`. Data
    parallel (a torchrun worker, `sae_core.training.ddp`): `ranks` and this rank's `device`; every rank
    reads its rows of each batch (its train.data_lanes only: `loader.iter_batches`), rank 0
    alone writes checkpoints. device None: train.device. reads: counts what the batches (not
    the init sample) fetch from storage.
    acts_out: transcoders' target, the dataset of their output hook paired row for row with
    `acts` (`sae_core.data.pairing`); each batch is then [B, 2d], x then y (data parallel:
    each rank reads its lanes of both datasets).
    """
    manifest = acts.manifest(ActivationsManifest)
    d = manifest.width
    rows = manifest.splits["train"].rows
    train_cfg = members[0].train
    if any((m.sae.kind in TRANSCODER_KINDS) != (acts_out is not None) for m in members):
        raise ConfigError(
            "transcoders train on a pair of datasets (model.hook and model.hook_out), SAEs on "
            "one; give acts_out for transcoders only, and train the two apart"
        )
    steps_per_epoch = rows // train_cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={train_cfg.batch_size} exceeds the {rows} training activations; "
            "lower train.batch_size or raise data.train_tokens"
        )

    take = ranks.rows(train_cfg.batch_size)
    device = device or pick_device(train_cfg.device)

    def source(epoch: int, start_batch: int) -> Iterator[torch.Tensor]:
        return iter_batches(
            acts,
            "train",
            train_cfg.batch_size,
            train_cfg.seed,
            epoch,
            start_batch,
            take=take,
            lanes=train_cfg.data_lanes,
            pin_memory=device.type == "cuda",
            reads=reads,
            paired_with=acts_out,
        )

    def init_sample() -> torch.Tensor:
        """[size, d] ([size, 2d] for transcoders, x then y): read by rank 0 alone and sent to
        the others (every rank's SAE starts alike)."""
        size = min(INIT_SAMPLE_TOKENS, rows)
        seed = train_cfg.seed + 1
        if not ranks.distributed:
            return next(iter_batches(acts, "train", size, seed, paired_with=acts_out))
        if ranks.leader:
            shared = next(iter_batches(acts, "train", size, seed, paired_with=acts_out)).to(device)
        else:  # NCCL sends device tensors only; both hooks have width d
            shared = torch.empty(size, d if acts_out is None else 2 * d, device=device)
        ranks.broadcast_([shared])
        return shared.cpu()

    return run_group(
        d,
        members,
        source,
        steps_per_epoch,
        init_sample,
        store=store,
        device=device,
        progress=progress,
        ranks=ranks,
    )


def write_trained(
    writer: DatasetWriter, acts: DatasetRef, trainer: Trainer, acts_out: DatasetRef | None = None
) -> TrainResult:
    """Fill `writer` with a trained SAE: weights, configs, history and the manifest."""
    sae = trainer.final_sae()
    history = trainer.state.history
    writer.write_bytes(WEIGHTS_FILE, sae.cpu().to_bytes())
    writer.write_json(
        "config.json", {"sae": trainer.sae.cfg.model_dump(), "train": trainer.cfg.model_dump()}
    )
    writer.write_json("history.json", history)
    manifest = sae_manifest(trainer, writer.fingerprint, acts, acts_out)
    writer.manifest = manifest
    return TrainResult(sae, history, manifest)


def train_sae(
    acts: DatasetRef,
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    writer: DatasetWriter,
    checkpoint_dir: str,
    progress: bool = True,
) -> TrainResult:
    """Train one SAE on the `train` split of a committed activations dataset (`train_group`)
    and fill `writer`."""
    member = GroupMember(sae_cfg, train_cfg, checkpoint_dir)
    [trainer] = train_group(acts, [member], writer.store, progress)
    return write_trained(writer, acts, trainer)
