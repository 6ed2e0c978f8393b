"""What a store holds (`saeflow ls`) and what of it nothing needs (`saeflow gc`).

Plain functions over the store. The registry is not read here: the caller passes the datasets
the registered versions use (tasks/housekeeping.py reads them from MLflow), and everything
they were made from, followed through the manifests, is never garbage.

Garbage is only ever:
- the checkpoint of an SAE that is committed (training needs it only before the commit);
- an unfinished attempt (a folder without a manifest) that nobody has written to for a while;
- completion marks left in a committed dataset by a writer killed after its commit.
Committed datasets are never garbage: they are the cache that makes a re-run cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sae_core.storage.store import MANIFEST, PROGRESS, Store

CHECKPOINTS = "checkpoints"  # training checkpoints, `checkpoints/<fingerprint of the sae>`
SAE = "sae"


@dataclass(frozen=True)
class StoredFolder:
    """One folder `<kind>/<name>` of a store: a dataset (committed or not) or a checkpoint."""

    path: str
    committed: bool
    size: int  # bytes, every file below it
    modified: float | None  # the newest file's time, seconds since the epoch (None: no file)
    created: float | None  # when the manifest was written: the commit (None: uncommitted)
    inputs: tuple[str, ...] = ()  # the datasets it was made from (store-relative paths)
    marks_left: bool = False  # completion marks of a committed dataset (`_progress/`)

    @property
    def kind(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Garbage:
    path: str
    reason: str
    size: int


def inventory(store: Store) -> list[StoredFolder]:
    """Every `<kind>/<name>` folder of the store with its size, times and inputs."""
    store.invalidate_cache()
    folders = []
    for kind in store.listdir(""):
        if kind.startswith("_"):  # a writability probe (`_probe-<uuid>`), not a folder of data
            continue
        for name in store.listdir(kind):
            folders.append(_folder(store, f"{kind}/{name}"))
    return folders


def _folder(store: Store, path: str) -> StoredFolder:
    root = store.path(path)
    files = {
        p.removeprefix(f"{root}/"): info
        for p, info in store.fs.find(root, detail=True).items()
        if info.get("type") != "directory"
    }
    times = [t for t in (_time(info) for info in files.values()) if t is not None]
    manifest = files.get(MANIFEST)
    inputs: tuple[str, ...] = ()
    if manifest is not None:
        inputs = tuple(sorted(_links(json.loads(store.read_bytes(f"{path}/{MANIFEST}")), store)))
    return StoredFolder(
        path=path,
        committed=manifest is not None,
        size=sum(int(info.get("size") or 0) for info in files.values()),
        modified=max(times, default=None),
        created=None if manifest is None else _time(manifest),
        inputs=inputs,
        marks_left=manifest is not None and any(f.startswith(f"{PROGRESS}/") for f in files),
    )


def _time(info: Mapping[str, Any]) -> float | None:
    """A file's modification time: local files give `mtime`, S3 objects `LastModified`."""
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return None if value is None else float(value)


def _links(manifest: Any, store: Store) -> set[str]:
    """The datasets of `store` a manifest names (its inputs), as store-relative paths."""
    prefix = f"{store.uri}/"
    own = manifest.get("uri") if isinstance(manifest, dict) else None
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.startswith(prefix) and value != own:
            found.add("/".join(value.removeprefix(prefix).split("/")[:2]))

    walk(manifest)
    return found


def users(
    folders: Iterable[StoredFolder], direct: Mapping[str, Iterable[str]]
) -> dict[str, set[str]]:
    """Which registered versions use each folder: `direct` (path -> version labels, the
    datasets a version names) followed down the inputs of each dataset to those it was made
    from. A path a version names stays in the answer even when the store lacks it."""
    inputs = {f.path: f.inputs for f in folders}
    used: dict[str, set[str]] = {}
    for path, labels in direct.items():
        todo = [path]
        while todo:
            here = todo.pop()
            known = used.setdefault(here, set())
            if not set(labels) <= known:
                known.update(labels)
                todo.extend(inputs.get(here, ()))
    return used


def garbage(
    folders: Iterable[StoredFolder],
    needed: Iterable[str],
    now: float,
    min_age_s: float,
) -> list[Garbage]:
    """What nothing references: checkpoints of committed SAEs, unfinished attempts untouched
    for `min_age_s` (younger ones may be a run at work), and the completion marks a committed
    dataset kept. `needed` (the folders registered versions use, `users`) is never garbage,
    whatever state it is in."""
    folders = list(folders)
    keep = set(needed)
    committed = {f.path for f in folders if f.committed}
    found = []
    for f in folders:
        if f.path in keep:
            continue
        if f.kind == CHECKPOINTS:
            if f"{SAE}/{f.name}" in committed:
                found.append(Garbage(f.path, "checkpoint of a committed SAE", f.size))
        elif not f.committed:
            if f.modified is None or now - f.modified >= min_age_s:
                found.append(Garbage(f.path, "unfinished attempt", f.size))
        elif f.marks_left:
            found.append(
                Garbage(f"{f.path}/{PROGRESS}", "completion marks of a committed dataset", 0)
            )
    return found
