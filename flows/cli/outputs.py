"""The paths a command writes for the user (`--out`, `--export`): checked before any download or
computation, and never an existing file or a folder's contents replaced without `--force`."""

from __future__ import annotations

from pathlib import Path

from sae_core.errors import ConfigError

FORCE_HINT = "choose another path, or add --force to replace"


def output_folder(path: str, flag: str, force: bool) -> Path:
    """A folder to write files into: new, empty, or (with `force`) one whose files may be
    replaced; never an existing file."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(
            f"{flag} {path}: a file is there, not a folder; give a new or empty folder"
        )
    if target.is_dir():
        held = sorted(p.name for p in target.iterdir())
        if held and not force:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise ConfigError(
                f"{flag} {path}: the folder is not empty ({shown}); {FORCE_HINT} its files"
            )
    else:
        _creatable(target, flag, path)
    return target


def output_file(path: str, flag: str, force: bool) -> Path:
    """A file to write: new, or (with `force`) an existing file to replace; never a folder,
    and its folder must exist."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(
            f"{flag} {path}: a folder is there; give a file path, e.g. {target / 'sae.safetensors'}"
        )
    if not target.parent.is_dir():
        raise ConfigError(
            f"{flag} {path}: there is no folder {target.parent}; create it first or write elsewhere"
        )
    if target.exists() and not force:
        raise ConfigError(f"{flag} {path}: the file exists; {FORCE_HINT} it")
    return target


def _creatable(target: Path, flag: str, path: str) -> None:
    """Raise unless the nearest existing folder above `target` is a folder (not a file)."""
    above = next(p for p in target.absolute().parents if p.exists())
    if not above.is_dir():
        raise ConfigError(f"{flag} {path}: {above} is a file, so no folder can be made below it")
