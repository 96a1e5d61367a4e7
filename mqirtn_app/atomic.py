"""Crash-safe saving: files are written under a temporary name, flushed to disk (`fsync`) and renamed (`os.replace`),
folders are staged as a temporary sibling and swapped in, and a manifest of SHA-256 content hashes lets a reader tell a
complete save from a mixed one.

The one piece of code the gallery index, train.py's checkpoints and its final model save through.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes a written file's bytes to disk (a rename is only durable once the renamed bytes are)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a folder's entries (creations, renames, removals) to disk; a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that `path` holds either its old bytes or all of `data`, never a part."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


def file_hashes(folder: str | os.PathLike, names=None) -> dict[str, str]:
    """`{relative POSIX path: sha256}` of the files `names` (default: every file, recursively) of `folder`."""
    folder = Path(folder)
    paths = (
        [folder / name for name in names] if names is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    )
    return {path.relative_to(folder).as_posix(): sha256_file(path) for path in paths}


def differing_files(folder: str | os.PathLike, expected: dict[str, str]) -> list[str]:
    """The files of the manifest `expected` that are missing from `folder` or whose bytes differ."""
    folder = Path(folder)
    return sorted(
        name
        for name, digest in expected.items()
        if not (folder / name).is_file() or sha256_file(folder / name) != digest
    )


def staging_folder(target: str | os.PathLike) -> Path:
    """An empty temporary sibling of `target` (`.NAME.partial`) to write a new version of `target` into."""
    target = Path(target)
    staged = target.parent / f".{target.name}.partial"
    if staged.exists():
        shutil.rmtree(staged)  # left by an interrupted save: never part of any version
    staged.mkdir(parents=True)
    return staged


def previous_folder(target: str | os.PathLike) -> Path:
    """Where `swap_in_folder` keeps the previous version of `target` while the new one is renamed into place."""
    target = Path(target)
    return target.parent / f".{target.name}.previous"


def swap_in_folder(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Replaces the folder `target` by the complete folder `staged` (two renames; `fsync`ed first).

    A crash between the two renames leaves no `target` and the whole previous version in `previous_folder(target)`
    (readers look there: `recover_folder`); after them the previous version is removed.
    """
    staged, target = Path(staged), Path(target)
    for path in staged.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_dir(staged)
    previous = previous_folder(target)
    _remove(previous)
    if target.exists():
        os.replace(target, previous)
    os.replace(staged, target)
    fsync_dir(target.parent)
    _remove(previous)


def _remove(path: Path) -> None:
    """Removes a folder, or a link (never what it leads to), if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def recover_folder(target: str | os.PathLike) -> Path | None:
    """Where the last complete version of `target` is: `target`, or its previous version when a crash interrupted
    `swap_in_folder` between its renames; None when there is neither."""
    target = Path(target)
    if target.exists():
        return target
    previous = previous_folder(target)
    return previous if previous.is_dir() else None


def move_files_into(staged: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Renames every file of the complete folder `staged` (flat) into `folder`, replacing files of the same names, then
    removes `staged`. Files are `fsync`ed before the first rename, so `folder` holds the previous files until the new
    ones are all on disk; the renames themselves take microseconds."""
    staged, folder = Path(staged), Path(folder)
    files = sorted(path for path in staged.iterdir() if path.is_file())
    if any(path.is_dir() for path in staged.iterdir()):
        raise ValueError(f"`staged` {str(staged)!r} must hold files only")
    for path in files:
        fsync_file(path)
    fsync_dir(staged)
    for path in files:
        os.replace(path, folder / path.name)
    fsync_dir(folder)
    staged.rmdir()
