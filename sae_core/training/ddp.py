"""Data-parallel training: the train stage runs `train.world_size` torchrun workers on each of
`train.nnodes` nodes.

Parent (`train_data_parallel`, called by the stage on every node): writes the inputs as a small
JSON file, runs `python -m torch.distributed.run` with W workers of this module on that SPEC
(`torchrun_command`: on one node a rendezvous on a free localhost port; on several, a static
rendezvous at `train.rendezvous`, node 0 hosting it, ranks numbered node by node), streams the
workers' output, waits, and on node 0 returns the manifests rank 0 reports (the stage commits
them: data first, manifest last); on the other nodes it returns None and the stage waits for
node 0's commit on the shared store.
Workers (`main`): join the group (gloo on CPU, NCCL with one GPU per rank on CUDA) and run
`sae_core.training.train.train_group` with their `Ranks` (one SAE or several sharing one read of the
data; each rank reads only its lanes of the split); rank 0 writes the outputs and checkpoints.
Each rank prints the bytes it read.

A failing rank writes its error (type, message, time) next to the spec; the parent re-raises
the earliest one its node saw: configuration and storage errors as themselves (final), anything
else as `DataParallelFailed` (a task may retry it; training resumes from the last checkpoint).
A node that dies takes the run down on every node (its peers' collectives fail). Workers stop
by themselves when the launching process is gone (a killed `saeflow run`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from sae_core.config import SAEConfig, TrainConfig
from sae_core.errors import ConfigError, DatasetDamaged, StoreError
from sae_core.sae.ranks import Ranks
from sae_core.storage import faults, loader
from sae_core.storage.manifests import ActivationsManifest, SaeManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import DatasetWriter
from sae_core.training import train as training
from sae_core.training.group import GroupMember
from sae_core.training.resources import check_world_size

RESULT_FILE = "result.json"
_CODE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this sae_core
_ERROR_PREFIX = "error-rank"
# Errors that re-raise as themselves in the parent: a retry would only repeat them.
_FINAL = {cls.__name__: cls for cls in (ConfigError, StoreError, DatasetDamaged)}


class DataParallelFailed(RuntimeError):
    """A torchrun worker failed (or the launcher did) for a reason that may pass on a re-run."""


def torchrun_command(train: TrainConfig, spec: Path) -> list[str]:
    """The launcher's command line: train.world_size workers of this module on this node, one
    node of train.nnodes (torchrun's own files in the spec's folder, removed with it)."""
    if train.nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        host, _, port = (train.rendezvous or "").rpartition(":")
        rendezvous = [
            f"--nnodes={train.nnodes}",
            f"--node_rank={train.node_rank}",
            f"--master_addr={host}",
            f"--master_port={port}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc_per_node={train.world_size}",
        f"--log-dir={spec.parent / 'torchrun'}",
        "-m",
        "sae_core.training.ddp",
        str(spec),
    ]


def train_data_parallel(
    acts: DatasetRef,
    members: Sequence[GroupMember],
    datasets: Sequence[str],
    progress: bool = True,
    acts_out: DatasetRef | None = None,
) -> list[SaeManifest] | None:
    """Train the members (sharing `sae_core.training.group.data_order`) with train.world_size torchrun
    workers on this node; rank 0 fills each member's dataset folder on acts' store (without its
    manifest, which it reports: the caller on node 0 commits it; None on the other nodes).
    acts_out: transcoders' target dataset, paired with acts (`training.train_group`).
    Blocks until every worker of this node has ended."""
    train = members[0].train
    check_world_size(train)
    with tempfile.TemporaryDirectory(prefix="saeflow-ddp-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "acts": acts.model_dump(),
                    "acts_out": None if acts_out is None else acts_out.model_dump(),
                    "members": [
                        {
                            "sae": m.sae.model_dump(mode="json"),
                            "train": m.train.model_dump(mode="json"),
                            "checkpoint_dir": m.checkpoint_dir,
                            "dataset": dataset,
                        }
                        for m, dataset in zip(members, datasets, strict=True)
                    ],
                    "progress": progress,
                    "parent_pid": os.getpid(),
                }
            )
        )
        env = os.environ.copy()
        # torchrun would set 1 thread per worker; give each its share of the cores instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // train.world_size)))
        # The workers import the very sae_core this process runs (not another installed copy).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_CODE_ROOT, env.get("PYTHONPATH")]))
        try:
            code = subprocess.run(torchrun_command(train, spec), env=env).returncode
        except OSError as err:
            raise DataParallelFailed(f"could not start torchrun: {err}") from None
        result = Path(tmp) / RESULT_FILE
        if code == 0 and train.node_rank > 0:
            return None  # rank 0, on node 0, reported to node 0's parent
        if code == 0 and result.exists():
            return [SaeManifest.model_validate(m) for m in json.loads(result.read_text())]
        raise rank_error(Path(tmp), code)


def rank_error(folder: Path, code: int) -> Exception:
    """The earliest error a rank reported, as an exception for the parent to raise."""
    reports = [json.loads(p.read_text()) for p in folder.glob(f"{_ERROR_PREFIX}*.json")]
    if not reports:
        return DataParallelFailed(
            f"data-parallel training failed: torchrun exited with {code} and no rank reported "
            "an error (killed? out of memory?); see the output above, fix the cause and run again"
        )
    first = min(reports, key=lambda r: r["time"])
    if first["type"] in _FINAL:
        return _FINAL[first["type"]](first["message"])
    return DataParallelFailed(
        f"data-parallel training failed on rank {first['rank']}: {first['type']}: "
        f"{first['message']} (traceback above); fix the cause and run again: training resumes "
        "from its last checkpoint"
    )


def _exit_when_gone(pid: int, every_s: float = 1.0) -> None:
    """End this worker once process `pid` (the stage that launched torchrun) is gone: a killed
    stage must not leave ranks writing its checkpoints while a re-run trains (checked in a
    daemon thread; a checkpoint write cut short is harmless, writes are atomic)."""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(
                    f"sae_core.training.ddp: the launching process {pid} is gone; stopping",
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=watch, name="ddp-parent-watch", daemon=True).start()


def main(spec_path: str) -> None:
    """A torchrun worker: train this rank's share; rank 0 writes outputs and the result file."""
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec_path).parent
    members = [
        GroupMember(
            SAEConfig.model_validate(m["sae"]),
            TrainConfig.model_validate(m["train"]),
            m["checkpoint_dir"],
        )
        for m in spec["members"]
    ]
    rank = int(os.environ.get("RANK", "0"))
    _exit_when_gone(spec["parent_pid"])
    try:
        ranks, device = Ranks.from_env(members[0].train.device)
        acts = DatasetRef.model_validate(spec["acts"])
        out = spec["acts_out"]
        acts_out = None if out is None else DatasetRef.model_validate(out)
        store = faults.open_store(acts.store)
        reads = loader.ReadTally()
        trainers = training.train_group(
            acts, members, store, spec["progress"], ranks, device, reads, acts_out
        )
        split = acts.manifest(ActivationsManifest).splits["train"]
        print(
            f"sae_core.training.ddp: rank {ranks.rank} of {ranks.world_size} read "
            f"{reads.bytes} bytes for its batches; the train split holds "
            f"{sum(shard.bytes for shard in split.shards)}",
            flush=True,
        )
        if ranks.leader:
            done = [
                training.write_trained(
                    DatasetWriter(store, m["dataset"]), acts, trainer, acts_out
                ).manifest.to_json()
                for m, trainer in zip(spec["members"], trainers, strict=True)
            ]
            (folder / RESULT_FILE).write_text(json.dumps(done))
    except BaseException as err:
        report = {
            "rank": rank,
            "type": type(err).__name__,
            "message": str(err),
            "time": time.time(),
        }
        (folder / f"{_ERROR_PREFIX}{rank}.json").write_text(json.dumps(report))
        traceback.print_exc()
        sys.exit(1)  # without leaving the group: a peer may be stuck in a collective
    Ranks.leave()


if __name__ == "__main__":
    main(sys.argv[1])
