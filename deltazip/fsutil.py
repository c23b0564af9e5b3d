"""Atomic output directories: fill a temp sibling `.NAME.tmp-XXXXXXXX`, swap it in for NAME when complete.

A writer holds an exclusive flock on its temp directory while it works; the kernel drops the lock when the
process dies, so a temp directory nobody holds is the leftover of a killed writer. `clean_stale(parent)`
removes such leftovers (and the `.NAME.old-XXXXXXXX` a killed replace may leave); it runs at the start of
every atomic_dir and when the delta pool opens a store.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from deltazip.errors import DeltazipError

STALE_RE = re.compile(r"\..+\.(tmp|old)-[0-9a-f]{8}")
STALE_AFTER_S = 2.0  # covers the moment between a writer's mkdir and its flock


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse a non-directory, or a non-empty directory unless `overwrite` (call before any work starts)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DeltazipError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DeltazipError(f"{out_dir} already exists and is not empty (pass --force / overwrite=True to "
                            "replace it)")


def _lock(path: Path, blocking: bool = True) -> int | None:
    """An open fd holding an exclusive flock on directory `path`; None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def clean_stale(parent: str | Path, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the leftovers of killed atomic_dir writers in `parent`: `.NAME.tmp-*` directories no live
    writer holds, and `.NAME.old-*` directories (a previous version set aside). When a kill left NAME itself
    missing, the `.old-*` version is renamed back to NAME instead. Returns what was removed or restored."""
    parent = Path(parent)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    done = []
    now = time.time()
    for entry in entries:
        match = STALE_RE.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        path = Path(entry.path)
        try:
            if now - entry.stat().st_mtime < min_age_s:
                continue
            fd = _lock(path, blocking=False)
        except OSError:
            continue
        if fd is None:  # a live writer
            continue
        try:
            target = parent / entry.name[1:match.start(1) - 1]
            if match.group(1) == "old" and not os.path.lexists(target):
                with suppress(OSError):
                    os.rename(path, target)
                    done.append(target)
                    continue
            shutil.rmtree(path, ignore_errors=True)
            done.append(path)
        finally:
            os.close(fd)
    return done


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir`, on any failure it is removed.

    An existing `out_dir` is swapped with the new one in one step (renameat2 exchange; else renamed aside
    first), and deleted after the new one is in place. Leftovers of killed writers are cleaned up first.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir.parent)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    fd = _lock(tmp)
    try:
        yield tmp
        if out_dir.is_dir() and not out_dir.is_symlink() and _exchange(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous version
        elif os.path.lexists(out_dir):
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def link_tree(source: str | Path, dest: str | Path) -> Path:
    """A real directory `dest` with the files of `source` hard-linked (copied across file systems): a view
    of an artifact inside another store without a symlink pointing out of that store."""
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file():
            try:
                os.link(item.resolve(), dest / item.name)
            except OSError:
                shutil.copy2(item, dest / item.name)
    return dest
