"""One SAE's optimiser state and step: Adam, AuxK dead-latent bookkeeping, the unit-norm
decoder's projected step, the weights' moving average and exact checkpoints.

`Trainer.step(x_raw)` is one optimiser step on a [B, d] batch. A checkpoint (one safetensors
byte string, `Trainer.checkpoint_bytes`) holds the weights (with BatchTopK's threshold), their
moving average (train.ema_decay), Adam's moments, the dead-latent counters, the data cursor
(epoch, batch), the RNG state and the history, so a run killed at any point restarts from it and,
on CPU, ends with bit-identical weights.

Expander SAEs with sae.resample_dead: at every dead_window_tokens boundary the latents dead
at that moment are re-initialised inside their mask support (`ExpanderSAE.resample_`), their
rows of Adam's moments and of the moving average reset, and their silence counters restarted
(a full window before they count as dead again). The draw is seeded by (train.seed, step), so
a resumed run resamples identically.

Data parallel (`ranks`): the loss terms' normalisers, BatchTopK's threshold, the dead-latent
hits and the step's figures are reduced over the global batch and the gradients summed before
the decoder-gradient projection, so every rank applies the same update to the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load as load_tensors

from sae_core.config import TRAIN_EXECUTION_FIELDS, SAEConfig, TrainConfig
from sae_core.errors import ConfigError
from sae_core.sae import SparseAutoencoder, build_sae, fused_loss, kernels, unit_adam
from sae_core.sae.base import FIRE_THRESHOLD
from sae_core.sae.normalize import InputNorm, geometric_median
from sae_core.sae.ranks import SINGLE, Ranks
from sae_core.sae.safetensors_io import safetensors_bytes, safetensors_metadata
from sae_core.sae.transcoder import TranscoderSAE
from sae_core.training.recipe import schedule
from sae_core.training.schedule_free import ScheduleFreeAdam

CHECKPOINT_FORMAT = "saeflow.checkpoint"
ADAM_BETAS = (0.9, 0.999)


def _no_mark(phase: str) -> None:
    pass


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


def init_sae(
    d: int, sae_cfg: SAEConfig, sample: torch.Tensor, seed: int, encoder_scale: float = 1.0
) -> SparseAutoencoder:
    """A fresh SAE of kind sae_cfg.kind: normalisation fitted on `sample` [N, d] raw, b_pre at
    its (normalised) geometric median or mean, tied encoder/decoder drawn from `seed`, the
    encoder (where it is a parameter of its own) scaled by `encoder_scale` (the recipe's). A
    transcoder's sample is [N, 2d], x then y: its output normalisation and b_dec come from y."""
    sample, target = sample[:, :d], sample[:, d:]  # a transcoder's sample holds y after x
    norm = InputNorm.fit(sae_cfg.normalize, sample)
    sae = build_sae(d, sae_cfg, norm, generator=torch.Generator().manual_seed(seed))
    if isinstance(sae, TranscoderSAE):
        sae.fit_output(target)
    x, _ = norm.apply(sample.float())
    centre = geometric_median(x) if sae_cfg.b_pre_init == "geometric_median" else x.mean(dim=0)
    with torch.no_grad():
        sae.b_pre.copy_(centre)
        encoder = getattr(sae, "W_enc", None)
        if isinstance(encoder, torch.nn.Parameter):
            encoder.mul_(encoder_scale)
    return sae


class Trainer:
    """Owns the SAE, its optimiser, the dead-latent counters, the weights' moving average (when
    train.ema_decay is set) and the training state. ranks: the data-parallel group; the
    weights are rank 0's from the start (broadcast), identical everywhere afterwards.
    total_steps: the run's length, which the recipe's schedule follows (None: unknown, a
    constant rate; `sae_core.training.recipe.schedule`)."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        train_cfg: TrainConfig,
        device: torch.device | str = "cpu",
        ranks: Ranks = SINGLE,
        total_steps: int | None = None,
    ):
        self.device = torch.device(device)
        self.sae = sae.to(self.device)
        self.ranks = ranks
        ranks.broadcast_(list(self.sae.state_dict().values()))
        self.cfg = train_cfg
        self.schedule = schedule(train_cfg, sae.n_latents, total_steps)
        self.lr = self.schedule.peak_lr
        self.opt: torch.optim.Optimizer
        if self.schedule.optimizer == "schedule_free_adam":
            self.opt = ScheduleFreeAdam(
                self.sae.parameters(), lr=self.lr, beta2=ADAM_BETAS[1], eps=train_cfg.adam_eps
            )
        else:
            self.opt = torch.optim.Adam(
                self.sae.parameters(),
                lr=self.lr,
                betas=ADAM_BETAS,
                eps=train_cfg.adam_eps,
                fused=True,
            )
        self.dead = DeadLatents(sae.n_latents, sae.cfg.dead_window_tokens, self.device)
        self.ema: dict[str, torch.Tensor] | None = None
        if train_cfg.ema_decay is not None:
            self.ema = {name: p.detach().clone() for name, p in self.sae.named_parameters()}
        self.gemm_dtype = getattr(torch, train_cfg.dtype)
        self.state = TrainState()
        self.resumed_from_tokens = 0
        # BatchTopK: training rows the shipped weights' threshold is calibrated on (run_group).
        self.threshold_rows: torch.Tensor | None = None

    @property
    def ships_other_weights(self) -> bool:
        """Whether the SAE it ships (`final_sae`) holds weights other than the trained ones."""
        return isinstance(self.opt, ScheduleFreeAdam) or self.ema is not None

    def final_sae(self) -> SparseAutoencoder:
        """The SAE to ship: schedule-free Adam's average (its decoder rows brought back to unit
        norm, the codes keeping their contributions), or the moving average of the weights when
        enabled, else the weights. A BatchTopK SAE's threshold, tracked on the training weights,
        is calibrated for the averaged ones on `threshold_rows` when run_group has set them."""
        if isinstance(self.opt, ScheduleFreeAdam):
            averaged = self.opt.averaged()
            weights = {n: averaged.get(p, p.detach()) for n, p in self.sae.named_parameters()}
        elif self.ema is not None:
            weights = self.ema
        else:
            return self.sae
        sae = build_sae(self.sae.d, self.sae.cfg, self.sae.norm).to(self.device)
        if isinstance(sae, TranscoderSAE):  # a constant of its kind, not a weight
            sae.out_norm = self.sae.out_norm
        sae.load_state_dict(self.sae.state_dict() | weights)
        if isinstance(self.opt, ScheduleFreeAdam):
            sae.unit_decoder_keeping_codes_()
        if sae.cfg.batch_topk and self.threshold_rows is not None:
            sae.calibrate_threshold_(self.threshold_rows)
        return sae

    def step(
        self, x_raw: torch.Tensor, mark: Callable[[str], None] | None = None
    ) -> dict[str, float]:
        """One optimiser step on raw activations x_raw: [B, d] (data parallel: this rank's
        [B / world_size, d] slice of the global batch; a transcoder's: [B, 2d], x then y);
        returns the global batch's figures.

        mark(phase) is called as each phase ends (normalize, gemm, topk, decode, backward,
        optimizer), for the benchmark's time breakdown.
        """
        mark = mark or _no_mark
        sae, ranks = self.sae, self.ranks
        # A transcoder's batch holds its target y beside x.
        x_raw, target = sae.split_batch(x_raw.to(self.device, torch.float32, non_blocking=True))
        # x - b_pre, which the encoder and the decoder both read, in the normaliser's pass.
        x, _ = sae.norm.apply(x_raw, offset=sae.b_pre.detach())
        mark("normalize")
        # b_enc is added by the top-k as it reads the GEMM's output (one pass fewer over B x n).
        pre = sae.preacts(x, with_bias=False, dtype=self.gemm_dtype, centred=True)
        mark("gemm")
        sel = sae.select(pre, self.dead.mask(), bias=sae.b_enc, ranks=ranks)
        if sae.cfg.batch_topk:
            sae.update_threshold(sel, ranks=ranks)
        mark("topk")
        out = sae.losses(x, sel, ranks=ranks, with_recon=False, centred=True, target=target)
        mark("decode")
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.sum_grads()
        mark("backward")
        lr = self.schedule.lr(self.state.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
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
            "lr": lr,
        } | ({"resampled": resampled} if sae.cfg.resample_dead else {})
        st.history.append(record)
        return record

    def optimizer_step(self) -> None:
        """Adam on the summed gradients, the decoder's kept to unit-norm rows: its gradient
        projected onto each row's tangent space before the step, the rows renormalised after.

        A dense unit-row decoder (TopK) on the native kernels without gradient clipping takes
        all three in one pass (`unit_adam.adam_unit_rows_`), with torch's Adam state for it."""
        sae = self.sae
        W = sae.unit_row_decoder()
        G = W.grad if W is not None else None
        one_pass = (
            G is not None
            and self.cfg.grad_clip_norm is None
            and fused_loss.fused_available(W, G)
            and W.is_contiguous()
            and G.is_contiguous()
        )
        if isinstance(self.opt, ScheduleFreeAdam) or not one_pass:
            sae.project_decoder_grad()
            if self.cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip_norm)
            if isinstance(self.opt, ScheduleFreeAdam):
                self.opt.step(constrain=sae.normalize_decoder)  # on z, the stepped sequence
                return
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
        unit_adam.adam_unit_rows_(
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
            if isinstance(self.opt, ScheduleFreeAdam):
                self.opt.reset_rows_(p, dead)
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
        return safetensors_bytes(tensors, meta)

    @classmethod
    def from_checkpoint(
        cls,
        data: bytes,
        train_cfg: TrainConfig,
        device: torch.device | str = "cpu",
        ranks: Ranks = SINGLE,
        total_steps: int | None = None,
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
        if isinstance(sae, TranscoderSAE):
            sae.out_norm = InputNorm.from_json(json.loads(meta["out_normalization"]))
        sae.load_state_dict(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        trainer = cls(sae, train_cfg, device, ranks, total_steps)
        names = [name for name, _ in sae.named_parameters()]
        opt_state = trainer.opt.state_dict()
        opt_state["state"] = {}
        for i, name in enumerate(names):
            prefix = f"optim.{name}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                opt_state["state"][i] = state
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
