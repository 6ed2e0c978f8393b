"""Training several SAEs from one read of the data: each ends bit-identical to training it alone,
committed SAEs are skipped, an interrupted group resumes, and the data is read once."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load as load_tensors

from sae_core import stopping
from sae_core.config import SAEConfig, TrainConfig
from sae_core.errors import ConfigError
from sae_core.sae.safetensors_io import safetensors_metadata
from sae_core.stages import train as train_stage
from sae_core.storage.store import Store
from sae_core.training.group import (
    GroupMember,
    group_by_data_order,
    run_group,
    run_training,
    split_by_memory,
    tensor_source,
)
from sae_core.training.trainer import Trainer
from tests.helpers.activations import count_train_reads, sparse_dictionary_data, write_activations

D, BATCH = 32, 128
POINTS = [  # different n and k, BatchTopK with a moving average, an expander
    SAEConfig(n_latents=48, k=2, dead_window_tokens=512),
    SAEConfig(n_latents=96, k=5, dead_window_tokens=512, batch_topk=True),
    SAEConfig(
        n_latents=128, k=2, dead_window_tokens=256, kind="expander", degree=4, encoder="tied",
        resample_dead=True,
    ),
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_cfg(sae: SAEConfig, every: int = 1024) -> TrainConfig:
    ema = 0.9 if sae.batch_topk else None
    return TrainConfig(
        batch_size=BATCH,
        epochs=2,
        lr=3e-3,
        checkpoint_every_tokens=every,
        ema_decay=ema,
        recipe="paper" if ema else "budget",
    )


def _members(every: int = 1024) -> list[GroupMember]:
    return [GroupMember(s, _train_cfg(s, every), f"ckpt/{i}") for i, s in enumerate(POINTS)]


def _group(x, store=None, stop=None, members=None) -> list[Trainer]:
    return run_group(
        D, members or _members(), tensor_source(x, BATCH, 0), len(x) // BATCH,
        lambda: x[:1024], store=store, progress=False, stop_after_steps=stop,
    )  # fmt: skip


def _alone(x, member: GroupMember) -> Trainer:
    return run_training(
        D, member.sae, member.train, tensor_source(x, BATCH, 0), len(x) // BATCH,
        lambda: x[:1024], progress=False,
    )  # fmt: skip


def assert_same_training(a: Trainer, b: Trainer) -> None:
    """Weights (and the shipped moving average), Adam's moments, counters and history."""
    for name, t in a.final_sae().state_dict().items():
        assert torch.equal(t, b.final_sae().state_dict()[name]), name
    params_b = dict(b.sae.named_parameters())
    for name, p in a.sae.named_parameters():
        assert torch.equal(p, params_b[name]), name
        for key, value in a.opt.state[p].items():
            assert torch.equal(value, b.opt.state[params_b[name]][key]), (name, key)
    assert torch.equal(a.dead.since, b.dead.since)
    assert a.state.history == b.state.history


def test_each_sae_of_a_group_ends_bit_identical_to_training_it_alone():
    x, _ = sparse_dictionary_data(2048)
    torch.manual_seed(7)  # the group's SAEs must not depend on the process's RNG state
    group = _group(x)
    assert [t.state.step for t in group] == [32, 32, 32]
    assert any(r["resampled"] for r in group[2].state.history)  # the expander's seeded draws
    for member, trained in zip(_members(), group, strict=True):
        torch.manual_seed(99)
        assert_same_training(_alone(x, member), trained)
    assert all(t.sae._pre_buffer is None for t in group)  # the shared buffer is released


def test_a_group_refuses_members_with_another_data_order():
    x, _ = sparse_dictionary_data(512)
    members = _members()
    members[1] = members[1]._replace(train=members[1].train.model_copy(update={"seed": 1}))
    with pytest.raises(ConfigError, match="share train.batch_size, seed, epochs"):
        _group(x, members=members)
    points = [(m.sae, m.train) for m in members] + [(POINTS[0], _train_cfg(POINTS[0]))]
    assert group_by_data_order(points) == [[0, 2, 3], [1]]


def test_an_interrupted_group_resumes_each_sae_from_its_own_checkpoint(tmp_path):
    x, _ = sparse_dictionary_data(2048)
    store = Store(str(tmp_path / "store"))
    # The first SAE alone gets to step 21 (checkpoint at 16 = the end of epoch 0), then the group
    # is interrupted at step 10 (the others checkpointed at 8; the first is past it, untouched).
    first = _members()[0]
    run_training(
        D, first.sae, first.train, tensor_source(x, BATCH, 0), len(x) // BATCH,
        lambda: x[:1024], store=store, checkpoint_dir=first.checkpoint_dir, progress=False,
        stop_after_steps=21,
    )  # fmt: skip
    stopped = _group(x, store, stop=10)
    assert [t.state.step for t in stopped] == [16, 10, 10]
    served: list[tuple[int, int]] = []
    inner = tensor_source(x, BATCH, 0)

    def source(epoch: int, start: int):
        served.append((epoch, start))
        return inner(epoch, start)

    torch.manual_seed(12345)
    resumed = run_group(
        D, _members(), source, len(x) // BATCH, lambda: x[:1024], store=store, progress=False
    )
    assert [t.resumed_from_tokens for t in resumed] == [2048, 1024, 1024]
    assert served == [(0, 8), (1, 0)]  # from the earliest cursor, each epoch read once
    for member, trained in zip(_members(), resumed, strict=True):
        assert_same_training(_alone(x, member), trained)


@pytest.mark.usefixtures("stop_request")
def test_a_stop_request_ends_a_group_between_steps_and_it_resumes_from_its_checkpoints(tmp_path):
    x, _ = sparse_dictionary_data(2048)
    store = Store(str(tmp_path / "store"))
    inner = tensor_source(x, BATCH, 0)

    def stop_at_step_10(epoch: int, start: int):
        for batch, data in enumerate(inner(epoch, start), start):
            if (epoch, batch) == (0, 10):
                stopping.request(signal.SIGINT)  # as the CLI's handler does on Ctrl-C
            yield data

    with pytest.raises(stopping.StopRequested):
        run_group(
            D, _members(), stop_at_step_10, len(x) // BATCH, lambda: x[:1024], store=store,
            progress=False,
        )  # fmt: skip
    stopping.reset()
    # Steps 0-9 ran; each SAE's checkpoint (every 8 steps) is whole and is where it resumes.
    resumed = _group(x, store)
    assert [t.resumed_from_tokens for t in resumed] == [1024, 1024, 1024]
    for member, trained in zip(_members(), resumed, strict=True):
        assert_same_training(_alone(x, member), trained)


@pytest.fixture
def count_reads(monkeypatch):
    return count_train_reads(monkeypatch)


def _stored_acts(root) -> tuple[Store, object]:
    store = Store(str(root))
    x, _ = sparse_dictionary_data(2048)
    return store, write_activations(store, "activations/group", x * 3 + 1, x[:256])


def test_the_stage_commits_each_sae_where_a_lone_run_would_and_skips_committed_ones(
    tmp_path, count_reads
):
    points = [(m.sae, m.train.model_copy(update={"device": "cpu"})) for m in _members(2048)]
    store, acts = _stored_acts(tmp_path / "group")
    alone_store, alone_acts = _stored_acts(tmp_path / "alone")
    done_first = train_stage.train_sae(
        acts, *points[0], progress=False
    )  # committed before the group
    first_manifest = store.manifest(done_first.path)
    count_reads.clear()

    *refs, again = train_stage.train_sae_group(acts, [*points, points[2]], progress=False)
    assert again == refs[2]  # a point given twice is trained once
    assert refs[0] == done_first and store.manifest(done_first.path) == first_manifest
    # The init sample, 2 epochs, the init sample again: the BatchTopK point's threshold rows.
    assert count_reads == [(2048, 0, 0), (BATCH, 0, 0), (BATCH, 1, 0), (2048, 0, 0)]
    for ref, point in zip(refs, points, strict=True):
        loc = train_stage.locate_sae(acts, *point)
        assert (ref.path, ref.fingerprint) == (loc.path, loc.fingerprint)
        assert store.manifest(ref.path)["resumed_from_tokens"] == 0
        lone = train_stage.train_sae(alone_acts, *point, progress=False)
        for name in ("history.json", "config.json"):
            assert store.read_json(f"{ref.path}/{name}") == alone_store.read_json(
                f"{lone.path}/{name}"
            ), name
        weights = [
            s.read_bytes(f"{r.path}/sae.safetensors")
            for s, r in ((store, ref), (alone_store, lone))
        ]
        assert safetensors_metadata(weights[0]) == safetensors_metadata(weights[1])
        group_tensors, lone_tensors = (load_tensors(w) for w in weights)
        assert group_tensors.keys() == lone_tensors.keys()
        assert all(torch.equal(t, lone_tensors[name]) for name, t in group_tensors.items())

    count_reads.clear()
    assert train_stage.train_sae_group(acts, points, progress=False) == refs
    assert count_reads == []  # every SAE committed: nothing read, nothing trained


def test_a_group_over_the_memory_budget_trains_in_chunks_that_fit(
    tmp_path, count_reads, monkeypatch
):
    from sae_core.training.resources import training_bytes

    points = [(m.sae, m.train.model_copy(update={"device": "cpu"})) for m in _members(2048)]
    sizes = [training_bytes(sae, D) for sae, _ in points]  # the tied expander's: 0
    assert split_by_memory(_members(), D, sizes[0] + sizes[1]) == [[0, 1, 2]]
    assert split_by_memory(_members(), D, sizes[0] + sizes[1] - 1) == [[0], [1, 2]]
    assert split_by_memory(_members(), D, sizes[1] - 1) == [[0], [1], [2]]  # 1 alone is over
    monkeypatch.setattr(train_stage, "device_memory", lambda _: 2 * (sizes[0] + sizes[1] - 1))
    store, acts = _stored_acts(tmp_path)
    refs = train_stage.train_sae_group(acts, points, progress=False)
    assert all(store.manifest(ref.path) is not None for ref in refs)
    # Two chunks, two reads each, the second's BatchTopK point reading its threshold rows.
    assert [epoch for _, epoch, _ in count_reads] == [0, 0, 1] + [0, 0, 1, 0]
