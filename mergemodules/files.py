"""Output files written atomically: temporary names beside an output, cleanup of stale ones, checks before writing.

The bottom floor of the package: it imports nothing of it. Every output is written to a hidden
temporary ``.NAME.PID.XXXXXXXX.tmp`` beside it and renamed into place (:func:`atomic_write`). A
process killed mid-write leaves that file behind; the next write of the same output removes it when
its writer (PID) is no longer running on this machine and it has not changed for a minute.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "new_temp", "temp_name", "remove_stale_temps", "check_writable", "STALE_AFTER_S"]

logger = logging.getLogger(__name__)

STALE_AFTER_S = 60.0


def new_temp(path: Path, folder: bool = False) -> Path:
    """Create an empty hidden temporary file (or folder) beside ``path``, with the mode ``open()`` gives.

    The mode follows the umask (0644 under umask 022), as ``open(path, "w")`` or ``torch.save`` would.
    """
    tmp = temp_name(path)
    if folder:
        os.mkdir(tmp, 0o777)
    else:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def temp_name(path: Path) -> Path:
    """A new hidden temporary name beside ``path`` (nothing is created), as :func:`remove_stale_temps` recognises."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(path: Path, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove temporaries of ``path`` left by killed writers; returns the removed paths.

    Only entries named exactly as :func:`new_temp` names them for ``path``, whose writer process is
    gone and which have not been modified for ``min_age_s`` seconds, are removed.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or _running(int(match[1])):
            continue
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as err:
            logger.debug("could not remove stale temporary %s: %s", entry.path, err)
            continue
        logger.info("removed %s, left by an interrupted write of %s", entry.path, path)
        removed.append(Path(entry.path))
    return removed


def check_writable(path: Path) -> None:
    """Create and remove a temporary beside ``path``: raises the OSError (e.g. PermissionError) if it cannot."""
    os.unlink(new_temp(path))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The file gets the mode a plain ``open()`` gives (the umask's); temporaries of ``path`` left by a
    killed writer are removed first (:func:`remove_stale_temps`).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    remove_stale_temps(path)
    tmp = new_temp(path)
    try:
        mode = os.stat(tmp).st_mode & 0o777  # what open() gives under the umask
        write(str(tmp))
        os.chmod(tmp, mode)  # writers such as safetensors' save_file recreate the file with mode 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
