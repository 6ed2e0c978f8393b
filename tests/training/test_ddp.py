"""Data-parallel training (torchrun, gloo on CPU): W ranks compute what one process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import load as load_tensors

from sae_core.config import SAEConfig, TrainConfig, build_config
from sae_core.errors import ConfigError
from sae_core.stages import train as train_stage
from sae_core.storage import faults
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from sae_core.training.ddp import DataParallelFailed, rank_error
from tests.helpers.activations import sparse_dictionary_data, write_activations

ROOT = Path(__file__).resolve().parents[2]
SAE = SAEConfig(n_latents=256, k=3, dead_window_tokens=512, k_aux=16)  # some latents die


class Run(NamedTuple):
    weights: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    manifest: dict[str, Any]


def _train_group(
    tmp_path,
    name: str,
    saes: list[SAEConfig],
    world_size: int,
    epochs: int = 2,
    paired: bool = False,
    **train,
) -> list[Run]:
    """Train the SAEs as one group through the stage (epochs of 16 steps) on store `name`;
    paired: as transcoders, to a second hook's activations (a fixed map of the first's)."""
    store = Store(str(tmp_path / name))
    x, _ = sparse_dictionary_data(2048, seed=3)
    acts = write_activations(store, "activations/test", x * 5 + 2, x[:256])
    acts_out = None
    if paired:
        mix = torch.randn(x.shape[1], x.shape[1], generator=torch.Generator().manual_seed(4))
        y = torch.relu(x @ mix) + 0.1 * x
        acts_out = write_activations(store, "activations/out", y * 3 - 1, y[:256])
    cfg = TrainConfig(
        batch_size=128,
        lr=3e-3,
        device="cpu",
        checkpoint_every_tokens=1024,
        world_size=world_size,
        epochs=epochs,
        **train,
    )
    points = [(sae, cfg) for sae in saes]
    refs = train_stage.train_sae_group(acts, points, progress=False, acts_out=acts_out)
    return [
        Run(
            load_tensors(store.read_bytes(f"{ref.path}/sae.safetensors")),
            store.read_json(f"{ref.path}/history.json"),
            store.manifest(ref.path),
        )
        for ref in refs
    ]


def _train(tmp_path, name: str, sae: SAEConfig, world_size: int, epochs: int = 2, **train) -> Run:
    return _train_group(tmp_path, name, [sae], world_size, epochs, **train)[0]


def _assert_same_run(a: Run, b: Run, exact: bool = False) -> None:
    (wa, ha, _), (wb, hb, _) = a, b
    assert wa.keys() == wb.keys() and len(ha) == len(hb)
    for name in wa:
        if exact:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-4, msg=name)
    for ra, rb in zip(ha, hb, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-3, abs=1e-5), (ra["step"], key)


def test_two_ranks_match_one_rank_at_the_same_global_batch(tmp_path):
    """A group of two SAEs (one read of the data) on 2 ranks against the same group on 1."""
    saes = [SAE, SAEConfig(n_latents=128, k=4, dead_window_tokens=512, k_aux=16)]
    ones = _train_group(tmp_path, "one", saes, 1)
    twos = _train_group(tmp_path, "two", saes, 2)
    for one, two in zip(ones, twos, strict=True):
        _assert_same_run(one, two)
        assert one.manifest["n"] == two.manifest["n"]
    history = ones[0].history
    assert history[-1]["nmse"] < history[0]["nmse"]
    assert any(r["aux_loss"] > 0 for r in history), "AuxK never ran: the test would miss it"


# A few expander latents' first gradients here are ~1e-10 (typical: 6e-3), the size of the
# paper's Adam eps, so their first step, lr g / (|g| + eps), is set by g's last bits; 1 and 2
# ranks sum in different orders, and those weights part by up to lr. With eps = 1e-6 such a
# gradient moves its weight by ~1e-4 lr, and the test compares the data-parallel sums themselves
# (docs/SCALING.md, "Limit of that match for expander SAEs"). BatchTopK's b_enc has such
# gradients too: at the paper's eps 1 and 2 ranks parted by 2e-4 in b_enc, at 1e-6 by 7e-9.
TINY_GRADIENT_EPS = 1e-6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sae", "adam_eps"),
    [
        # A global threshold, and state.
        (SAE.model_copy(update={"batch_topk": True}), TINY_GRADIENT_EPS),
        (SAE.model_copy(update={"multi_topk": True}), None),
        (
            SAEConfig(
                kind="expander", degree=4, n_latents=256, k=3, dead_window_tokens=512, k_aux=16
            ),
            TINY_GRADIENT_EPS,
        ),
    ],
    ids=["batch_topk", "multi_topk", "expander"],
)
def test_two_ranks_match_one_rank_for_every_selection_and_kind(tmp_path, sae, adam_eps):
    train = {"ema_decay": 0.9, "recipe": "paper"} | ({"adam_eps": adam_eps} if adam_eps else {})
    one = _train(tmp_path, "one", sae, 1, **train)
    _assert_same_run(one, _train(tmp_path, "two", sae, 2, **train))


def test_a_skip_transcoder_on_two_ranks_matches_one_rank(tmp_path):
    """Each rank reads its lanes of both hooks' datasets, paired row for row."""
    tc = SAEConfig(
        kind="skip_transcoder", normalize="global", n_latents=256, k=3,
        dead_window_tokens=512, k_aux=16,
    )  # fmt: skip
    one, two = (_train_group(tmp_path, f"w{w}", [tc], w, paired=True)[0] for w in (1, 2))
    _assert_same_run(one, two)
    assert "W_skip" in one.weights and one.manifest["activations_out"].endswith("activations/out")
    assert one.history[-1]["nmse"] < 0.85 * one.history[0]["nmse"]


@pytest.mark.slow
def test_two_ranks_stopped_midway_resume_to_the_uninterrupted_run(tmp_path, monkeypatch):
    uninterrupted = _train(tmp_path, "store", SAE, 2)
    # The second checkpoint write fails on rank 0 (after 16 of 32 steps): the stage fails with
    # rank 0's error; the re-run resumes from the first checkpoint.
    monkeypatch.setenv("SAEFLOW_INJECT_FAULT", "checkpoints/@1")
    with pytest.raises(DataParallelFailed, match="rank 0: InjectedFault"):
        _train(tmp_path, "resumed", SAE, 2)
    monkeypatch.delenv("SAEFLOW_INJECT_FAULT")
    resumed = _train(tmp_path, "resumed", SAE, 2)
    _assert_same_run(uninterrupted, resumed, exact=True)
    assert resumed.manifest["resumed_from_tokens"] == 1024
    assert uninterrupted.manifest["resumed_from_tokens"] == 0


@pytest.mark.slow
def test_a_one_rank_checkpoint_resumes_on_two_ranks(tmp_path, monkeypatch):
    """The state is rank-independent (global counters, a cursor in global batches)."""
    uninterrupted = _train(tmp_path, "store", SAE, 1)
    faults.reset()
    monkeypatch.setenv("SAEFLOW_INJECT_FAULT", "checkpoints/@1")
    with pytest.raises(faults.InjectedFault):
        _train(tmp_path, "resumed", SAE, 1)
    monkeypatch.delenv("SAEFLOW_INJECT_FAULT")
    resumed = _train(tmp_path, "resumed", SAE, 2)
    assert resumed.manifest["resumed_from_tokens"] == 1024
    _assert_same_run(uninterrupted, resumed)


@pytest.mark.slow
def test_the_pipeline_trains_on_two_ranks(prefect, tiny_llama_dir, tiny_corpus_dir, tmp_path):
    from tests.helpers.pipeline import run, tiny_config

    store = str(tmp_path / "store")
    result = run(tiny_config(tiny_llama_dir, tiny_corpus_dir, store, train={"world_size": 2}))
    assert set(result.stages.values()) == {"computed"}
    manifest = Store(store).manifest(result.sae.path)
    rows = Store(store).manifest(result.activations.path)["splits"]["train"]["rows"]
    assert manifest["tokens_seen"] == rows // 256 * 256 and manifest["resumed_from_tokens"] == 0
    assert Store(store).exists(f"{result.sae.path}/sae.safetensors")


def _tagged_processes(tag: str) -> list[int]:
    """Pids of this user's processes whose environment holds `tag`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and tag.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_killing_the_stage_stops_its_ranks(tmp_path):
    """SIGKILL of the launching process (a killed `saeflow run`): torchrun and its workers end
    too, instead of training on beside a re-run."""
    tag = f"SAEFLOW_DDP_TEST_TAG={uuid.uuid4().hex}"
    code = (
        "import sys; from pathlib import Path; "
        "from tests.training.test_ddp import _train, SAE; "
        "_train(Path(sys.argv[1]), 'store', SAE, 2, epochs=200)"
    )
    # TMPDIR: the spec folder the killed stage cannot remove stays inside tmp_path.
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1], "TMPDIR": str(tmp_path)}
    # cwd=ROOT: `tests` imports as a package, as under pytest.
    stage = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "store" / "checkpoints").glob("*/last.safetensors")):
        assert stage.poll() is None and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.1)
    stage.kill()
    stage.wait()
    deadline = time.monotonic() + 30
    while (left := _tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the killed stage still run: {left}"
    assert not list((tmp_path / "store" / "sae").glob("*/sae.safetensors"))


def test_world_size_must_split_the_batch_into_equal_slices():
    with pytest.raises(ConfigError, match="train.world_size=3 does not divide train.batch_size"):
        build_config({}, ["train.world_size=3", "train.batch_size=4096"])
    with pytest.raises(ValueError, match="train.world_size=8 does not divide train.batch_size=4"):
        TrainConfig(batch_size=4, world_size=8)  # more ranks than rows
    assert TrainConfig(batch_size=4096, world_size=4).world_size == 4


def test_world_size_is_not_part_of_the_sae_address():
    """Like the device, it changes how a run executes (same result up to float rounding): a
    1-rank SAE serves a 2-rank request, and existing 1-rank addresses do not move."""
    acts = DatasetRef(store="/tmp/unused", path="activations/x", fingerprint="abc")
    one = train_stage.locate_sae(acts, SAE, TrainConfig())
    assert train_stage.locate_sae(acts, SAE, TrainConfig(world_size=2)) == one
    assert train_stage.locate_sae(acts, SAE, TrainConfig(seed=1)) != one


def test_the_earliest_rank_error_is_raised_final_errors_as_themselves(tmp_path):
    def report(rank: int, kind: str, message: str, at: float) -> None:
        record = {"rank": rank, "type": kind, "message": message, "time": at}
        (tmp_path / f"error-rank{rank}.json").write_text(json.dumps(record))

    err = rank_error(tmp_path, 1)
    assert isinstance(err, DataParallelFailed) and "no rank reported an error" in str(err)
    report(1, "RuntimeError", "Connection closed by peer", 2.0)  # a consequence
    report(0, "ConfigError", "sae.k=9 exceeds sae.n_latents=8; choose k <= n_latents", 1.0)
    err = rank_error(tmp_path, 1)
    assert type(err) is ConfigError and str(err).startswith("sae.k=9")
    report(0, "OSError", "disk full", 1.0)
    err = rank_error(tmp_path, 1)
    assert isinstance(err, DataParallelFailed)
    assert "failed on rank 0: OSError: disk full" in str(err)
