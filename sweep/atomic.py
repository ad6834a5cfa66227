"""Write files and folders so that a reader sees the old version or the whole new one, never a part.

Many writers share a work dir: threads of one sweep, sweep processes on one host and containers
whose processes may all be PID 1. A temporary name made from the PID (or a fixed suffix) is then
shared by writers that must not share it: one renames the folder another is still filling, or
deletes it. Temporary files and folders here are made with ``tempfile`` in the target's own
folder (unique whatever the PID, and on the same file system, so the rename is atomic), and their
contents are fsynced before the rename, so a crash right after it cannot leave an empty or
truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"


def write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically: a unique temp file beside it, fsynced, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def temp_dir_beside(target: Path) -> Path:
    """A new, empty folder with a unique name next to ``target`` (same file system), to fill and publish."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX))


def publish_dir(tmp: Path, target: Path) -> bool:
    """Rename the filled folder ``tmp`` to ``target`` unless another writer's folder is there already.

    Returns True when ``tmp`` became ``target``; False when ``target`` already existed (not empty),
    in which case ``tmp`` is removed and the caller reads the other writer's folder. Any other
    failure (permissions, another file system) is raised, and ``tmp`` removed.
    """
    try:
        fsync_tree(tmp)
        os.rename(tmp, target)  # atomic; an empty folder at ``target`` is replaced, a non-empty one is not
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return True


def replace_dir(tmp: Path, target: Path) -> None:
    """Swap the filled folder ``tmp`` in for ``target`` (which may exist); the old one is removed after.

    Between the two renames ``target`` is briefly absent, never half-written.
    """
    fsync_tree(tmp)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.replace(target, old)  # onto the empty folder mkdtemp made: unique, so no other writer's
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder itself, so their contents reach the disk before a rename."""
    for here, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(here))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a directory; the files themselves are synced
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
