"""Write files and directories so that a failure never leaves anything half-written."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import SmartTrimError


def _umask() -> int:
    # read, not set-and-restore where the OS lets us: setting it would briefly give other threads umask 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _publish_mode(tmp: Path, target: Path, default: int):
    """mkstemp/mkdtemp create 0600/0700 entries: a model written by one user (a CI job) could then not be read by
    another (the server). Give the new entry the mode an overwritten target had, else what open()/mkdir would."""
    try:
        mode = target.stat().st_mode & 0o7777 if target.exists() else default & ~_umask()
        tmp.chmod(mode)
    except OSError:
        pass  # a file system without modes: keep what it made


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=parent)
        os.close(fd)
    except OSError as e:
        raise SmartTrimError(f"{target}: cannot write here ({e.strerror or e})") from None
    tmp = Path(tmp)
    try:
        yield tmp
        _publish_mode(tmp, target, 0o666)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temporary directory beside ``target``; swap it in only if the block succeeds."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise SmartTrimError(f"{target}: cannot write here ({e.strerror or e})") from None
    try:
        yield tmp
        _publish_mode(tmp, target, 0o777)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj, allow_nan: bool = True) -> Path:
    """``obj`` as indented JSON, written atomically. ``allow_nan=False``: strict JSON (NaN or inf raise
    ValueError) for files other programs read."""
    path = Path(path)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n")
    return path
