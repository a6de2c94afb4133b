"""Outputs that appear whole or not at all: checks before heavy work, then temp + rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import GriffinError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, force: bool) -> Path:
    """Refuse before any heavy work: existing file without --force, missing or unwritable dir."""
    path = Path(path)
    if path.is_dir():  # said first: --force would not help
        raise GriffinError(f"{path} is a directory; give a file name such as {path / 'expert.safetensors'}")
    if path.exists() and not force:
        raise GriffinError(f"{path} exists; pass force=True to overwrite")
    check_writable(_parent_folder(path))
    return path


def _parent_folder(path: Path) -> Path:
    """The folder an output is made in, refused when it is missing or is a file."""
    parent = path.parent if str(path.parent) else Path(".")
    for above in (parent, *parent.parents):  # the nearest one that exists says what is wrong
        if above.exists():
            if not above.is_dir():
                raise GriffinError(f"{above} is a file, not a directory: {path} cannot be written under it")
            break
    if not parent.is_dir():
        raise GriffinError(f"output directory {parent} does not exist")
    return parent


def check_writable(directory: Path) -> None:
    """Refuse a directory we cannot create files in. os.access lies for root, so really create one."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".griffin.", suffix=".probe"):
            pass
    except OSError as e:
        raise GriffinError(f"output directory {directory} is not writable: {e.strerror}") from None


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename into place only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes it private, and writers that replace the file (safetensors) do too: the
        # output is an ordinary file, so its mode is set once it is written
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(path: str | os.PathLike, force: bool, marker: str) -> Path:
    """Refuse before any heavy work: existing output without --force, a non-empty folder without
    `marker` (never wipe a folder of other files, even with --force), missing or unwritable parent."""
    path = check_folder(path, replaced=True)
    if path.exists() and any(path.iterdir()):  # an empty directory has nothing to lose
        if not force:
            raise GriffinError(f"{path} exists; pass force=True to overwrite")
        if not (path / marker).is_file():
            raise GriffinError(f"{path} is not empty and holds no {marker}: not replacing it, even with force=True")
    return path


def check_folder(path: str | os.PathLike, create: bool = False, *, replaced: bool = False) -> Path:
    """An output folder's checks, the same for every command that writes one: not an existing
    file, its parent there, and writable where the files are made: in the folder, or in its parent
    when the folder is `replaced` whole (atomic_dir builds it beside and renames it in); `create` makes it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GriffinError(f"{path} exists and is not a directory; give a new directory name")
    parent = _parent_folder(path)
    if create:
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise GriffinError(f"cannot create output directory {path}: {e.strerror}") from None
    check_writable(path if path.is_dir() and not replaced else parent)
    return path


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; it replaces `path` only if the block succeeds,
    so an interrupted export leaves neither a partial directory nor the temp one."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers create private files (onnx's external data): ordinary ones
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
        if path.exists():  # --force: move the old one aside, drop it once the new one is in place
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "dir")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "dir", path)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
