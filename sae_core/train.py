"""Training an SAE (any kind): Adam, AuxK dead-latent bookkeeping, checkpoints and exact resume.

Layers, outermost first:
- `train_sae(acts, sae_cfg, train_cfg, writer, checkpoint_dir)`: reads the stored activations,
  trains, writes `sae.safetensors`, `config.json`, `history.json` and the manifest
  (`write_trained`). `train_group(acts, members, store)`: several SAEs that share the data
  order (`data_order`: batch size, seed, epochs) from one read of the data.
- `run_group(...)`, `run_training(...)` (a group of one): any batch source; each SAE resumes
  from its last checkpoint on the store if one exists, checkpoints every N tokens; returns
  the Trainers. Each SAE of a group ends bit-identical (CPU) to training it alone.
- `Trainer.step(x_raw)`: one optimiser step on a [B, d] batch.

A checkpoint (one safetensors file, written atomically) holds the weights (with BatchTopK's
threshold), their moving average (train.ema_decay), Adam's moments, the dead-latent counters,
the data cursor (epoch, batch), the RNG state and the history, so a run killed at any point
restarts from it and, on CPU, ends with bit-identical weights.

Expander SAEs with sae.resample_dead: at every dead_window_tokens boundary the latents dead
at that moment are re-initialised inside their mask support (`ExpanderSAE.resample_`), their
rows of Adam's moments and of the moving average reset, and their silence counters restarted
(a full window before they count as dead again). The draw is seeded by (train.seed, step), so
a resumed run resamples identically.

Data parallel (`ranks`, launched by `sae_core.ddp`): each rank steps on its slice of every
global batch; the loss terms' normalisers, BatchTopK's threshold, the dead-latent hits and the
step's figures are reduced over the global batch and the gradients summed before the
decoder-gradient projection, so every rank applies the same update to the same weights. The
state (weights, Adam, counters, data cursor in global batches) is the same on every rank:
rank 0 writes the checkpoints, every rank resumes from them, at any world size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tqdm.auto import tqdm

from sae_core.config import TRAIN_EXECUTION_FIELDS, ConfigError, SAEConfig, TrainConfig
from sae_core.normalize import InputNorm, geometric_median
from sae_core.ranks import SINGLE, Ranks
from sae_core.refs import DatasetRef
from sae_core.sae import WEIGHTS_FILE, SparseAutoencoder, build_sae, kernels, storage_report
from sae_core.sae.base import FIRE_THRESHOLD, safetensors_metadata
from sae_core.store import DatasetWriter, Store

CHECKPOINT_FILE = "last.safetensors"
CHECKPOINT_FORMAT = "saeflow.checkpoint"
INIT_SAMPLE_TOKENS = 32_768  # the released code's sample size for the geometric median
ADAM_BETAS = (0.9, 0.999)

# (epoch, start_batch) -> that epoch's [B, d] batches from start_batch on; same args, same batches.
BatchSource = Callable[[int, int], Iterator[torch.Tensor]]


def _no_mark(phase: str) -> None:
    pass


def default_lr(n_latents: int) -> float:
    """Gao et al.: 2e-4 / sqrt(n / 2^14)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


class DeadLatents:
    """Tokens since each latent last fired; dead = silent for at least `window` tokens."""

    def __init__(self, n: int, window: int, device: torch.device | str = "cpu"):
        self.window = window
        self.since = torch.zeros(n, dtype=torch.int64, device=device)

    def update(self, idx: torch.Tensor, vals: torch.Tensor, ranks: Ranks = SINGLE) -> None:
        """idx, vals: [B, k], the batch's (this rank's slice's) active latents. Cost O(B k + n),
        plus an all-reduce of n hit counts when data parallel."""
        hits = ranks.sum_(kernels.fire_counts(idx, vals, len(self.since), FIRE_THRESHOLD))
        self.since = torch.where(hits > 0, 0, self.since + idx.shape[0] * ranks.world_size)

    def mask(self) -> torch.Tensor:
        """[n] bool: the latents AuxK may use."""
        return self.since >= self.window

    def fraction(self, window: int | None = None) -> float:
        return float((self.since >= (window or self.window)).float().mean())


@dataclass
class TrainState:
    """The data cursor and counters a checkpoint restores."""

    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainResult:
    sae: SparseAutoencoder
    history: list[dict[str, float]]
    manifest: dict[str, Any]
    resumed_from_tokens: int  # 0 for a fresh run


def init_sae(d: int, sae_cfg: SAEConfig, sample: torch.Tensor, seed: int) -> SparseAutoencoder:
    """A fresh SAE of kind sae_cfg.kind: normalisation fitted on `sample` [N, d] raw, b_pre at
    its (normalised) geometric median or mean, tied encoder/decoder drawn from `seed`."""
    norm = InputNorm.fit(sae_cfg.normalize, sample)
    sae = build_sae(d, sae_cfg, norm, generator=torch.Generator().manual_seed(seed))
    x, _ = norm.apply(sample.float())
    centre = geometric_median(x) if sae_cfg.b_pre_init == "geometric_median" else x.mean(dim=0)
    with torch.no_grad():
        sae.b_pre.copy_(centre)
    return sae


class Trainer:
    """Owns the SAE, its optimiser, the dead-latent counters, the weights' moving average (when
    train.ema_decay is set) and the training state. ranks: the data-parallel group; the
    weights are rank 0's from the start (broadcast), identical everywhere afterwards."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        train_cfg: TrainConfig,
        device: torch.device | str = "cpu",
        ranks: Ranks = SINGLE,
    ):
        self.device = torch.device(device)
        self.sae = sae.to(self.device)
        self.ranks = ranks
        ranks.broadcast_(list(self.sae.state_dict().values()))
        self.cfg = train_cfg
        self.lr = train_cfg.lr or default_lr(sae.n_latents)
        self.opt = torch.optim.Adam(
            self.sae.parameters(), lr=self.lr, betas=ADAM_BETAS, eps=train_cfg.adam_eps, fused=True
        )
        self.dead = DeadLatents(sae.n_latents, sae.cfg.dead_window_tokens, self.device)
        self.ema: dict[str, torch.Tensor] | None = None
        if train_cfg.ema_decay is not None:
            self.ema = {name: p.detach().clone() for name, p in self.sae.named_parameters()}
        self.gemm_dtype = getattr(torch, train_cfg.dtype)
        self.state = TrainState()
        self.resumed_from_tokens = 0

    def final_sae(self) -> SparseAutoencoder:
        """The SAE to ship: the moving average of the weights when enabled, else the weights."""
        if self.ema is None:
            return self.sae
        sae = build_sae(self.sae.d, self.sae.cfg, self.sae.norm).to(self.device)
        sae.load_state_dict(self.sae.state_dict() | self.ema)
        return sae

    def step(
        self, x_raw: torch.Tensor, mark: Callable[[str], None] | None = None
    ) -> dict[str, float]:
        """One optimiser step on raw activations x_raw: [B, d] (data parallel: this rank's
        [B / world_size, d] slice of the global batch); returns the global batch's figures.

        mark(phase) is called as each phase ends (normalize, gemm, topk, decode, backward,
        optimizer), for the benchmark's time breakdown.
        """
        mark = mark or _no_mark
        sae, ranks = self.sae, self.ranks
        # x - b_pre, which the encoder and the decoder both read, in the normaliser's pass.
        x_raw = x_raw.to(self.device, torch.float32, non_blocking=True)
        x, _ = sae.norm.apply(x_raw, offset=sae.b_pre.detach())
        mark("normalize")
        # b_enc is added by the top-k as it reads the GEMM's output (one pass fewer over B x n).
        pre = sae.preacts(x, with_bias=False, dtype=self.gemm_dtype, centred=True)
        mark("gemm")
        sel = sae.select(pre, self.dead.mask(), bias=sae.b_enc, ranks=ranks)
        if sae.cfg.batch_topk:
            sae.update_threshold(sel, ranks=ranks)
        mark("topk")
        out = sae.losses(x, sel, ranks=ranks, with_recon=False, centred=True)
        mark("decode")
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.sum_grads()
        mark("backward")
        self.optimizer_step()
        if self.ema is not None:
            with torch.no_grad():
                for name, p in sae.named_parameters():
                    self.ema[name].lerp_(p, 1 - self.cfg.ema_decay)
        self.dead.update(out.latent_idx, out.latent_vals, ranks)
        mark("optimizer")

        batch = x.shape[0] * ranks.world_size
        st = self.state
        st.step += 1
        st.tokens_seen += batch
        st.batch_in_epoch += 1
        window = sae.cfg.dead_window_tokens
        boundary = st.tokens_seen // window > (st.tokens_seen - batch) // window
        resampled = self.resample_dead() if sae.cfg.resample_dead and boundary else 0
        # Each rank's loss terms are its shares of the global batch's: their sums are its figures.
        # Activations are >= 0, so their signs count the active ones (exact below 2^24 entries):
        # 0.05 ms here, where summing the booleans of (> 0) took 0.23.
        terms = [out.loss, out.nmse, out.aux_loss, torch.sign(out.latent_vals).sum()]
        summed = ranks.sum_(torch.stack([t.detach().double() for t in terms]))
        loss, nmse, aux_loss, active = summed.tolist()
        record = {
            "step": st.step,
            "tokens": st.tokens_seen,
            "loss": loss,
            "nmse": nmse,
            "aux_loss": aux_loss,
            "l0": active / batch,
            "dead_fraction": self.dead.fraction(),
        } | ({"resampled": resampled} if sae.cfg.resample_dead else {})
        st.history.append(record)
        return record

    def optimizer_step(self) -> None:
        """Adam on the summed gradients, the decoder's kept to unit-norm rows: its gradient
        projected onto each row's tangent space before the step, the rows renormalised after.

        A dense unit-row decoder (TopK) on the native kernels without gradient clipping takes
        all three in one pass (`kernels.adam_unit_rows_`), with torch's Adam state for it."""
        sae = self.sae
        W = sae.unit_row_decoder()
        G = W.grad if W is not None else None
        one_pass = (
            G is not None
            and self.cfg.grad_clip_norm is None
            and kernels.fused_available(W, G)
            and W.is_contiguous()
            and G.is_contiguous()
        )
        if not one_pass:
            sae.project_decoder_grad()
            if self.cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip_norm)
            self.opt.step()
            sae.normalize_decoder()
            return
        W.grad = None  # Adam steps every other parameter; W's step is the fused pass below
        self.opt.step()
        W.grad = G
        group = next(g for g in self.opt.param_groups if any(p is W for p in g["params"]))
        state = self.opt.state[W]
        if not state:  # torch's fused Adam layout, so checkpoints read back either way
            state["step"] = torch.zeros((), dtype=torch.float32, device=W.device)
            state["exp_avg"] = torch.zeros_like(W, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(W, memory_format=torch.preserve_format)
        state["step"] += 1
        kernels.adam_unit_rows_(
            W,
            G,
            state["exp_avg"],
            state["exp_avg_sq"],
            int(state["step"]),
            group["lr"],
            group["betas"],
            group["eps"],
        )

    @torch.no_grad()
    def sum_grads(self) -> None:
        """Data parallel: replace each rank's gradients by their sum over ranks (the global
        batch's loss gradient), one all-reduce of a flattened buffer, as DDP does. A parameter
        without a gradient on every rank keeps none (Adam skips it, as alone)."""
        if not self.ranks.distributed:
            return
        params = list(self.sae.parameters())
        has_grad = torch.tensor([p.grad is not None for p in params], device=self.device)
        has_grad = self.ranks.max_(has_grad.to(torch.int32))
        for p, anywhere in zip(params, has_grad.tolist(), strict=True):
            if anywhere and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        flat = self.ranks.sum_(torch.cat([g.reshape(-1) for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    @torch.no_grad()
    def resample_dead(self) -> int:
        """Re-initialise the dead latents inside their support (expander SAEs); returns how many.

        Their rows of Adam's moments and of the moving average follow, and their silence
        counters restart. Seeded by (train.seed, step): a resumed run draws the same values.
        """
        dead = self.dead.mask().nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.state.step)
        params = dict(self.sae.named_parameters())
        for name in self.sae.resample_(dead, g):
            p = params[name]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in self.opt.state.get(p, {}):
                    self.opt.state[p][key][dead] = 0.0
            if self.ema is not None:
                self.ema[name][dead] = p[dead]
        self.dead.since[dead] = 0
        return int(dead.numel())

    # Checkpoints -------------------------------------------------------------------------------
    def checkpoint_bytes(self) -> bytes:
        """Everything needed to continue bit-identically, as one safetensors byte string."""
        tensors: dict[str, torch.Tensor] = {}
        names = [name for name, _ in self.sae.named_parameters()]
        for name, t in self.sae.state_dict().items():
            tensors[f"model.{name}"] = t
        for name, t in (self.ema or {}).items():
            tensors[f"ema.{name}"] = t
        for i, state in self.opt.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optim.{names[i]}.{key}"] = value
        tensors["dead.since"] = self.dead.since
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        st = asdict(self.state)
        history = st.pop("history")
        meta = self.sae.metadata() | {
            "format": CHECKPOINT_FORMAT,
            "train_config": self.cfg.model_dump_json(exclude=TRAIN_EXECUTION_FIELDS),
            "state": json.dumps(st),
            "history": json.dumps(history),
        }
        return save_tensors(tensors, metadata=meta)

    @classmethod
    def from_checkpoint(
        cls,
        data: bytes,
        train_cfg: TrainConfig,
        device: torch.device | str = "cpu",
        ranks: Ranks = SINGLE,
    ) -> Trainer:
        meta = safetensors_metadata(data)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"not a saeflow checkpoint (format={meta.get('format')!r})")
        saved_train = TrainConfig.model_validate_json(meta["train_config"])
        ignored = TRAIN_EXECUTION_FIELDS | {"checkpoint_every_tokens"}
        if saved_train.model_dump(exclude=ignored) != train_cfg.model_dump(exclude=ignored):
            raise ConfigError(
                "checkpoint was written with another train config; delete its checkpoint folder to start over"
            )
        tensors = load_tensors(data)
        sae = build_sae(
            int(meta["d"]),
            SAEConfig.model_validate_json(meta["config"]),
            InputNorm.from_json(json.loads(meta["normalization"])),
        )
        sae.load_state_dict(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        trainer = cls(sae, train_cfg, device, ranks)
        names = [name for name, _ in sae.named_parameters()]
        opt_state = trainer.opt.state_dict()
        opt_state["state"] = {
            i: {
                key: tensors[f"optim.{name}.{key}"]
                for key in ("step", "exp_avg", "exp_avg_sq")
                if f"optim.{name}.{key}" in tensors
            }
            for i, name in enumerate(names)
            if f"optim.{name}.exp_avg" in tensors
        }
        trainer.opt.load_state_dict(opt_state)
        if trainer.ema is not None:
            for name, t in trainer.ema.items():
                t.copy_(tensors[f"ema.{name}"])
        trainer.dead.since.copy_(tensors["dead.since"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.device)
        trainer.state = TrainState(**json.loads(meta["state"]), history=json.loads(meta["history"]))
        trainer.resumed_from_tokens = trainer.state.tokens_seen
        return trainer


class GroupMember(NamedTuple):
    """One SAE of a group trained on a shared batch stream; checkpoint_dir: store-relative."""

    sae: SAEConfig
    train: TrainConfig
    checkpoint_dir: str | None = None


def data_order(train_cfg: TrainConfig) -> tuple[int, int, int, str, int]:
    """What fixes the batches an SAE sees, in order (and where and on how many ranks it trains):
    SAEs that agree on it can share one read of the data (`run_group`)."""
    return (
        train_cfg.batch_size,
        train_cfg.seed,
        train_cfg.epochs,
        train_cfg.device,
        train_cfg.world_size,
    )


def group_by_data_order(points: Sequence[tuple[SAEConfig, TrainConfig]]) -> list[list[int]]:
    """Indices of `points` grouped by `data_order`, groups and members in first-seen order."""
    groups: dict[tuple[int, int, int, str, int], list[int]] = {}
    for i, (_, train_cfg) in enumerate(points):
        groups.setdefault(data_order(train_cfg), []).append(i)
    return list(groups.values())


def split_by_memory(members: Sequence[GroupMember], d: int, budget: int) -> list[list[int]]:
    """Indices of `members` in consecutive chunks whose training state together (the lower
    bound `preflight.training_bytes` of each) stays within `budget` bytes; a member over the
    budget alone gets a chunk of its own. Each chunk is one read of the data."""
    from sae_core.preflight import training_bytes

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
) -> Trainer:
    """The member's trainer: from its checkpoint when there is one, else fresh (seeded)."""
    ckpt = _checkpoint_path(member, store)
    if ckpt is not None and store.exists(ckpt):
        trainer = Trainer.from_checkpoint(store.read_bytes(ckpt), member.train, device, ranks)
        if trainer.sae.cfg != member.sae or trainer.sae.d != d:
            raise ConfigError(
                f"checkpoint {ckpt} belongs to another SAE config; delete it to start over"
            )
        return trainer
    torch.manual_seed(member.train.seed)
    sae = init_sae(d, member.sae, init_sample(), member.train.seed)
    return Trainer(sae, member.train, device, ranks)


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
            "train: a group's SAEs must share train.batch_size, seed, epochs, device and world_size; "
            "group them with group_by_data_order"
        )
    sample: list[torch.Tensor] = []

    def shared_sample() -> torch.Tensor:
        if not sample:
            sample.append(init_sample())
        return sample[0]

    device = torch.device(device)
    trainers, rngs = [], []
    for member in members:
        trainers.append(_start(d, member, store, shared_sample, device, ranks))
        rngs.append(_rng_state(device))
    sample.clear()
    train_cfg = members[0].train
    _share_buffer(trainers, train_cfg.batch_size // ranks.world_size)  # this rank's rows
    ckpts = [_checkpoint_path(m, store) if ranks.leader else None for m in members]
    states = [t.state for t in trainers]
    first = min(st.epoch * steps_per_epoch + st.batch_in_epoch for st in states)
    desc = "train sae" if len(members) == 1 else f"train {len(members)} saes"
    with tqdm(
        total=train_cfg.epochs * steps_per_epoch,
        initial=first,
        desc=desc,
        unit="step",
        disable=not progress or not ranks.leader,
    ) as bar:
        for epoch in range(min(st.epoch for st in states), train_cfg.epochs):
            due = [st.batch_in_epoch for st in states if st.epoch == epoch]
            start = min(due, default=steps_per_epoch)
            batches = source(epoch, start) if start < steps_per_epoch else iter(())
            for batch_in_epoch, x in enumerate(batches, start):
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


def summarize(trainer: Trainer) -> dict[str, Any]:
    """The final figures for the manifest. final_nmse: mean over the last 5% of steps."""
    sae, st = trainer.sae, trainer.state
    tail = st.history[-max(1, len(st.history) // 20) :]
    window = min(sae.cfg.dead_window_tokens, max(st.tokens_seen, 1))
    return {
        "sae_kind": sae.cfg.kind,
        "d": sae.d,
        "n": sae.n_latents,
        "k": sae.k,
        "k_aux": sae.k_aux,
        "normalization": sae.norm.to_json(),
        "tokens_seen": st.tokens_seen,
        "steps": st.step,
        "lr": trainer.lr,
        "final_nmse": sum(r["nmse"] for r in tail) / len(tail) if tail else float("nan"),
        # AuxK's criterion (silent for dead_window_tokens) and, for runs shorter than the
        # window, the share of latents silent over the whole run.
        "dead_fraction": trainer.dead.fraction(),
        "dead_fraction_run": trainer.dead.fraction(window),
        "weights": "ema" if trainer.ema is not None else "last",
        "storage": storage_report(sae),
    } | ({"batch_topk_threshold": float(sae.threshold)} if sae.cfg.batch_topk else {})


def train_group(
    acts: DatasetRef,
    members: Sequence[GroupMember],
    store: Store,
    progress: bool = True,
    ranks: Ranks = SINGLE,
    device: torch.device | None = None,
) -> list[Trainer]:
    """Train the members (sharing `data_order`) on the `train` split of a committed activations
    dataset, reading it once per epoch for all of them; checkpoints go to `store`.

    Each member's checkpoint_dir is a store-relative folder outside the dataset folder (it
    survives the clearing of unfinished attempts), e.g. `checkpoints/<fingerprint>`. Data
    parallel (a torchrun worker, `sae_core.ddp`): `ranks` and this rank's `device`; every rank
    reads its rows of each batch, rank 0 alone writes checkpoints. device None: train.device.
    """
    from sae_core.activations import iter_batches
    from sae_core.device import pick_device

    manifest = acts.manifest()
    d = int(manifest["width"])
    rows = int(manifest["splits"]["train"]["rows"])
    train_cfg = members[0].train
    steps_per_epoch = rows // train_cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={train_cfg.batch_size} exceeds the {rows} training activations; "
            "lower train.batch_size or raise data.train_tokens"
        )
    for sae_cfg, _, _ in members:
        if sae_cfg.k_aux is not None and sae_cfg.k_aux > sae_cfg.n_latents:
            raise ConfigError(
                f"sae.k_aux={sae_cfg.k_aux} exceeds sae.n_latents={sae_cfg.n_latents}"
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
            pin_memory=device.type == "cuda",
        )

    def init_sample() -> torch.Tensor:
        size = min(INIT_SAMPLE_TOKENS, rows)
        return next(iter_batches(acts, "train", size, train_cfg.seed + 1, 0, 0))

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


def write_trained(writer: DatasetWriter, acts: DatasetRef, trainer: Trainer) -> TrainResult:
    """Fill `writer` with a trained SAE: weights, configs, history and the manifest."""
    sae = trainer.final_sae()
    history = trainer.state.history
    writer.write_bytes(WEIGHTS_FILE, sae.cpu().to_bytes())
    writer.write_json(
        "config.json", {"sae": trainer.sae.cfg.model_dump(), "train": trainer.cfg.model_dump()}
    )
    writer.write_json("history.json", history)
    writer.manifest = {"kind": "sae", "schema_version": 1, "activations": acts.uri} | summarize(
        trainer
    )
    return TrainResult(sae, history, writer.manifest, trainer.resumed_from_tokens)


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
