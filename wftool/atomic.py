"""Writing files so that a crash or a full disk never leaves half of one behind.

Everything wft writes (model directories, checkpoints, exports, reports) is assembled under a
temporary name beside its destination and renamed into place. What a killed run left under
such a name is removed the next time the same destination is written.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from wftool.errors import WftError


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """`.<name>.<kind>-<random>` beside `path`: where it is assembled before the rename."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def remove_leftovers(path: Path, kinds: tuple[str, ...] = ("tmp", "old", "del")) -> None:
    """Remove what a killed writer of `path` left beside it (`.<name>.tmp-*`, `.old-*`,
    `.del-*`). An `.old-*` copy with no `path` (a kill between the two renames of a
    replacement) is put back instead; a copy being deleted is renamed `.del-*` first, so a
    half-deleted one is never put back."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if "old" in kinds and olds and not path.exists():
        os.replace(olds[-1], path)
    for kind in kinds:
        for leftover in parent.glob(f".{path.name}.{kind}-*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_disk_full(err: BaseException) -> bool:
    """True for an out-of-space error however the writing library wrapped it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        # torch's zip writer reports a short write as "unexpected pos N vs M".
        if "No space left on device" in text or "unexpected pos" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(what: str, where: Path, kept: str) -> WftError:
    """The message for a full disk: what was being written, where, and what is intact."""
    return WftError(f"the disk is full: writing {what} to {where} failed; {kept}",
                    f"free space on {_mount_of(where)} (or point the output elsewhere) and run "
                    "the same command again")


def _mount_of(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path
