"""One rule for every on-disk cache entry of crome (key statistics, sampled text, context
templates, layer choice): ``cached(path, compute, dump, load)``.

* Written atomically: a temporary file of this process, fsynced, then renamed over the entry.
* Computed once: a lock file beside the entry (``flock``) lets one process compute while the
  others wait, and then read what it wrote.
* Checked: the entry starts with a header holding its payload's size and sha256; a torn or
  corrupted entry is reported in one warning line and computed again.
* A cache folder that cannot be written (read-only, full) gets one warning line, and the value is
  computed and used without being kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
MAGIC = b"crome-cache v1"


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def encode(payload: bytes) -> bytes:
    """The entry: a header line (magic, size, sha256), then the payload."""
    return b"%s %d %s\n" % (MAGIC, len(payload), hashlib.sha256(payload).hexdigest().encode()) + payload


def decode(raw: bytes) -> bytes | None:
    """The payload of an intact entry, else None."""
    head, _, payload = raw.partition(b"\n")
    parts = head.split(b" ")
    if len(parts) != 4 or b" ".join(parts[:2]) != MAGIC:
        return None
    size, digest = parts[2], parts[3]
    if not size.isdigit() or int(size) != len(payload) or hashlib.sha256(payload).hexdigest().encode() != digest:
        return None
    return payload


def _read(path: Path, load: Callable[[bytes], T], what: str, quiet: bool = False):
    """(True, value) for an intact entry; (False, None) when missing or damaged (damage is warned
    unless ``quiet``)."""
    try:
        raw = path.read_bytes()
    except OSError:            # missing, or a folder that cannot hold it
        return False, None
    payload = decode(raw)
    if payload is not None:
        try:
            return True, load(payload)
        except Exception:   # noqa: BLE001 - a payload that does not parse is damage too
            pass
    if not quiet:
        warn(f"the cached {what} at {path} is damaged (cut short or changed); computing it again")
    return False, None


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path``: written to a temporary file of this process, fsynced, renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` + ".lock" (released when the process dies, too)."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def cached(path: Path, compute: Callable[[], T], dump: Callable[[T], bytes], load: Callable[[bytes], T],
           what: str = "entry", use: bool = True) -> T:
    """The value cached at ``path``, computed (once, across processes) when missing or damaged."""
    if not use:
        return compute()
    path = Path(path)
    hit, value = _read(path, load, what)
    if hit:
        return value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = locked(path)
        lock.__enter__()
    except OSError as e:
        warn(f"cannot write the cache folder {path.parent} ({e.strerror}): the {what} is computed and not kept")
        return compute()
    try:
        hit, value = _read(path, load, what, quiet=True)      # another process may have computed it while we waited
        if hit:
            return value
        value = compute()
        try:
            write_atomic(path, encode(dump(value)))
        except OSError as e:
            warn(f"cannot write the cached {what} to {path} ({e.strerror}): used without keeping it")
        return value
    finally:
        lock.__exit__(None, None, None)
