"""`saeflow ls` and `saeflow gc` over a store and the registry: which registered versions use
which datasets (read from MLflow here), what is garbage (sae_core.storage.housekeeping decides),
and its removal, under the stage locks of this state directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from sae_core.env import saeflow_home
from sae_core.errors import ConfigError, LockTimeout
from sae_core.stages.location import Location
from sae_core.storage.housekeeping import (
    CHECKPOINTS,
    SAE,
    Garbage,
    StoredFolder,
    garbage,
    inventory,
    users,
)
from sae_core.storage.locks import file_lock, is_held, remove_if_free
from sae_core.storage.store import Store, connect_failure
from tasks.caching import stage_lock_path
from tasks.tracking import mlflow_client, tracking_uri

URI_TAG = ("saeflow.", "_uri")  # run tags naming a dataset: saeflow.sae_uri, saeflow.eval_uri, ...


class Listing(NamedTuple):
    folders: list[StoredFolder]
    used_by: dict[str, set[str]]  # path -> registered versions ("NAME vN @alias") that use it
    registry_problem: str | None  # why the registry could not be read (None: it was)


class Collection(NamedTuple):
    garbage: list[Garbage]  # removed (or, dry run, to remove)
    in_use: list[str]  # garbage a run of this state directory holds the lock of: left
    locks: list[Path]  # lock files nobody held, removed (or to remove)


def registered_datasets(store: Store) -> dict[str, set[str]]:
    """Store-relative dataset path -> the registered versions whose runs name it. Raises
    ConfigError when the registry cannot be read."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return {}  # no registry in this state directory yet: nothing is registered
    _reachable(uri)
    try:
        client = mlflow_client()
        named: dict[str, set[str]] = {}
        for model in client.search_registered_models():
            aliases: dict[str, list[str]] = {}
            for alias, version in model.aliases.items():
                aliases.setdefault(str(version), []).append(f"@{alias}")
            for version in client.search_model_versions(f"name = '{model.name}'"):
                label = " ".join(
                    [f"{model.name} v{version.version}", *aliases.get(str(version.version), [])]
                )
                tags = client.get_run(version.run_id).data.tags
                for key, value in tags.items():
                    if key.startswith(URI_TAG[0]) and key.endswith(URI_TAG[1]):
                        if value.startswith(f"{store.uri}/"):
                            path = "/".join(value.removeprefix(f"{store.uri}/").split("/")[:2])
                            named.setdefault(path, set()).add(label)
    except Exception as err:  # noqa: BLE001 - any failure to read it means the same here
        raise ConfigError(f"registry {uri}: {_first_line(err)}") from None
    return named


def _reachable(uri: str) -> None:
    """ConfigError naming the fix when an http(s) tracking server does not answer."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    if (why := connect_failure(uri)) is not None:
        raise ConfigError(
            f"registry {uri} is unreachable ({why}): start it "
            '(saeflow services up; eval "$(saeflow services env)") or set MLFLOW_TRACKING_URI'
        )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def listing(store: Store) -> Listing:
    """Everything on the store, with the registered versions that use it (none, and the
    reason, when the registry cannot be read)."""
    folders = inventory(store)
    try:
        direct, problem = registered_datasets(store), None
    except ConfigError as err:
        direct, problem = {}, str(err)
    return Listing(folders, users(folders, direct), problem)


def collect(store: Store, dry_run: bool, min_age_s: float) -> Collection:
    """Find the garbage (nothing a registered version uses), then remove it unless dry_run:
    each folder under its stage lock, skipped when a run of this state directory holds it;
    then the lock files nobody holds. ConfigError, and nothing removed, when the registry
    cannot be read: without it, what a version needs is unknown."""
    folders = inventory(store)
    needed = users(folders, registered_datasets(store))
    found = garbage(folders, needed, time.time(), min_age_s)
    removed, in_use = [], []
    for item in found:
        lock = stage_lock_path(_owner(store, item.path))
        try:
            if dry_run:
                if is_held(lock):
                    raise LockTimeout(str(lock))
            else:
                with file_lock(lock, timeout=0):
                    store.rm(item.path)
            removed.append(item)
        except LockTimeout:
            in_use.append(item.path)
    locks = sorted((saeflow_home() / "locks").glob("*.lock"))
    freed = [path for path in locks if remove_if_free(path, dry_run)]
    return Collection(removed, in_use, freed)


def _owner(store: Store, path: str) -> Location:
    """The stage output whose lock guards `path`: a checkpoint is its SAE's."""
    kind, name = path.split("/")[:2]
    if kind == CHECKPOINTS:
        kind = SAE
    return Location(store=store.uri, path=f"{kind}/{name}", fingerprint=name)
