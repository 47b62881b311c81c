"""Folders that appear whole or not at all.

Patch sets, cached model folders and downloaded artifacts are all written the same way: into a
temporary sibling folder, which is renamed into place only when complete. A crash at any instant
therefore leaves either the old folder or the new one, never a half-written one that looks whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

DONE_MARKER = "DONE"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` by renames.

    An existing ``target`` is moved aside first and deleted after the new folder is in place, so a
    reader sees the old folder or the new one. On an exception the temporary folder is removed and
    ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_built(folder: str | os.PathLike) -> bool:
    return (Path(folder) / DONE_MARKER).is_file()


def build_once(folder: str | os.PathLike, build: Callable[[Path], object]) -> Path:
    """Build ``folder`` once: ``build(tmp)`` writes into a temporary folder, a ``DONE`` marker is
    written last and the folder is renamed into place. Later calls return it without building.
    ``build`` may return a sub-path of ``tmp`` (e.g. where a download landed); its relative path is
    kept in the marker and the same sub-path of ``folder`` is returned, now and on later calls."""
    folder = Path(folder)
    if not is_built(folder):
        with atomic_dir(folder) as tmp:
            got = build(tmp)
            rel = Path(got).relative_to(tmp).as_posix() if isinstance(got, (str, os.PathLike)) else "."
            (tmp / DONE_MARKER).write_text(rel + "\n")
    rel = (folder / DONE_MARKER).read_text().strip() or "."
    if rel == "ok" and not (folder / rel).exists():  # a folder built before markers held a sub-path
        rel = "."
    return folder if rel == "." else folder / rel
