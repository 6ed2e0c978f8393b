"""Multi-node data parallelism: two "nodes" on this machine, two torchrun launches with
--nnodes=2 on a loopback rendezvous (gloo), one rank each, against one shared store (slow);
the node settings and the launcher's command line (fast)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load as load_tensors

from sae_core.config import TrainConfig, build_config
from sae_core.errors import ConfigError
from sae_core.stages import train as train_stage
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from sae_core.training.ddp import torchrun_command
from tests.helpers import HELPERS
from tests.helpers.activations import sparse_dictionary_data, write_activations
from tests.training.test_ddp import SAE, Run, _assert_same_run, _tagged_processes, _train

ROOT = Path(__file__).resolve().parents[2]
WORKER = HELPERS / "node_worker.py"
TRAIN = {"batch_size": 128, "lr": 3e-3, "device": "cpu", "checkpoint_every_tokens": 1024}
_TAG, _SESSION = "SAEFLOW_TEST_NODE", uuid.uuid4().hex
_READ = re.compile(r"rank (\d) of 2 read (\d+) bytes for its batches; the train split holds (\d+)")


def _tag(node: int) -> str:
    """What marks node `node`'s processes of this test session (and no one else's)."""
    return f"{_SESSION}-node{node}"


def _port() -> int:
    """A loopback port nothing listens on (the moment it is returned)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dataset(store: Store) -> DatasetRef:
    """test_ddp's data (2048 rows), in row groups of 64 so that a rank can fetch a share."""
    x, _ = sparse_dictionary_data(2048, seed=3)
    return write_activations(store, "activations/test", x * 5 + 2, x[:256], row_group_size=64)


def _nodes(tmp_path: Path, acts: DatasetRef, epochs: int) -> list[subprocess.Popen]:
    """Node 0 and node 1, each the train stage with train.world_size=1 of train.nnodes=2; node
    i's processes (its stage, torchrun, its rank) carry `_tag(i)` in their environment."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes, port = [], _port()
    for node in (0, 1):
        env[_TAG] = _tag(node)
        train = TrainConfig(
            **TRAIN,
            epochs=epochs,
            nnodes=2,
            node_rank=node,
            rendezvous=f"127.0.0.1:{port}",
        )
        spec = {"acts": acts.model_dump(), "sae": SAE.model_dump(), "train": train.model_dump()}
        nodes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(spec)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return nodes


def _finish(nodes: list[subprocess.Popen]) -> list[str]:
    """Both nodes' output, once both succeeded."""
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output
        assert "node_worker: trained sae/" in output
    return outputs


def _trained(output: str) -> str:
    """The SAE's dataset path a node's stage returned."""
    return re.search(r"node_worker: trained (\S+)", output).group(1)


def _run(store: Store, output: str) -> Run:
    path = _trained(output)
    return Run(
        load_tensors(store.read_bytes(f"{path}/sae.safetensors")),
        store.read_json(f"{path}/history.json"),
        store.manifest(path),
    )


@pytest.mark.slow
def test_two_nodes_train_on_one_process_batches_each_reading_half(tmp_path):
    store = Store(str(tmp_path / "store"))
    outputs = _finish(_nodes(tmp_path, _dataset(store), epochs=2))
    one = _train(tmp_path, "one", SAE, 1)  # test_ddp's one-process run: the same data and SAE
    two = _run(store, outputs[0])
    _assert_same_run(one, two)
    assert _trained(outputs[1]) == _trained(outputs[0])  # node 1 returns node 0's commit
    assert two.manifest["resumed_from_tokens"] == 0
    # Bytes each rank fetched for its batches: before lanes every rank read the whole split
    # each epoch; now each reads its half (the activation column only).
    reads = dict((int(r), (int(b), int(s))) for r, b, s in _READ.findall(outputs[0] + outputs[1]))
    assert reads.keys() == {0, 1}
    for rank, (nbytes, split_bytes) in reads.items():
        share = nbytes / (2 * split_bytes)  # two epochs
        print(
            f"rank {rank}: {nbytes / 2:.0f} bytes per epoch of the split's {split_bytes} ({share:.2f})"
        )
        assert 0.35 <= share <= 0.6


@pytest.mark.slow
def test_a_node_killed_mid_run_and_both_run_again_resume(tmp_path):
    """SIGKILL every process of node 1 (its stage, torchrun, its rank) after the first
    checkpoint: node 0 fails too (its peer is gone), nothing is committed; both run again,
    resume from the checkpoint and end where an uninterrupted two-node run ends, to the bit."""
    epochs = 30  # 480 steps: the kill lands long before the end
    reference = Store(str(tmp_path / "reference"))
    uninterrupted = _run(reference, _finish(_nodes(tmp_path, _dataset(reference), epochs))[0])

    store = Store(str(tmp_path / "store"))
    acts = _dataset(store)
    nodes = _nodes(tmp_path, acts, epochs)
    deadline = time.monotonic() + 600  # a loaded machine starts torch slowly
    while not list((tmp_path / "store" / "checkpoints").glob("*/last.safetensors")):
        assert nodes[0].poll() is None and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.05)
    for pid in _tagged_processes(f"{_TAG}={_tag(1)}"):  # torchrun's rank: its own session
        os.kill(pid, signal.SIGKILL)
    output = nodes[0].communicate(timeout=600)[0]
    nodes[1].wait(timeout=30)
    assert nodes[0].returncode != 0, "node 0 finished although its peer was killed"
    assert "DataParallelFailed" in output, output
    assert not list((tmp_path / "store" / "sae").glob("*/_MANIFEST.json"))

    resumed = _run(store, _finish(_nodes(tmp_path, acts, epochs))[0])
    assert resumed.manifest["resumed_from_tokens"] > 0
    _assert_same_run(uninterrupted, resumed, exact=True)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.nnodes=2"], "train.nnodes=2 needs train.rendezvous=HOST:PORT"),
        (
            ["train.nnodes=2", "train.node_rank=2", "train.rendezvous=h:1"],
            "train.node_rank=2 is not below train.nnodes=2; number the nodes 0 .. 1",
        ),
        (["train.rendezvous=10.0.0.1"], "train.rendezvous='10.0.0.1' is not HOST:PORT"),
        (["train.rendezvous=h:70000"], "train.rendezvous='h:70000' is not HOST:PORT"),
        (
            ["train.world_size=2", "train.nnodes=3", "train.rendezvous=h:1"],
            "train.world_size=2 x train.nnodes=3 = 6 does not divide train.batch_size=4096",
        ),
        (
            ["train.world_size=16"],
            "train.world_size=16 does not divide train.data_lanes=8; set train.data_lanes",
        ),
    ],
)
def test_bad_node_settings_are_one_line_naming_the_field(sets, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        build_config({}, sets)
    assert "\n" not in str(caught.value)


def test_node_settings_are_not_part_of_the_sae_address_but_lanes_are():
    acts = DatasetRef(store="/tmp/unused", path="activations/x", fingerprint="abc")
    one = train_stage.locate_sae(acts, SAE, TrainConfig())
    nodes = TrainConfig(world_size=2, nnodes=4, node_rank=3, rendezvous="node0:29500")
    assert train_stage.locate_sae(acts, SAE, nodes) == one
    assert train_stage.locate_sae(acts, SAE, TrainConfig(data_lanes=16)) != one


def test_the_launcher_joins_node_0_with_a_static_rendezvous(tmp_path):
    spec = tmp_path / "spec.json"
    one = torchrun_command(TrainConfig(world_size=2), spec)
    assert "--standalone" in one and "--nproc_per_node=2" in one
    train = TrainConfig(world_size=4, nnodes=2, node_rank=1, rendezvous="10.0.0.1:29500")
    two = torchrun_command(train, spec)
    assert "--standalone" not in two
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500"} <= set(
        two
    )
    assert two[-3:] == ["-m", "sae_core.training.ddp", str(spec)]
