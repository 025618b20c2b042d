"""Result images on disk, content-addressed: a file's name is the SHA-256 of its bytes.

``<directory>/ab/cd/abcd…`` (two levels of 256, so no directory grows past a few thousand
entries at a million images). A file is written to ``tmp/`` first, fsynced, renamed into place
and its directory fsynced: a crash leaves either the whole file or none. Identical bytes are
stored once. Every method blocks (disk I/O): the service runs them in a thread.

A read checks the bytes against their name the first time this process reads the file and
whenever the file changed since (inode, size, mtime), so a corrupt or truncated file is found
and removed (the caller fetches it again) without hashing every byte on every view.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from gateway.core.images import sniff_image_type
from gateway.store.results import Blob

STALE_TMP_S = 3600.0  # a temporary file this old was left by a crash (another instance's too)
CHECKED_MAX = 100_000  # files whose digest this process has checked, remembered at most
CHUNK = 1024 * 1024
TEMPORARY = re.compile(r"[0-9a-f]{64}\.[0-9a-f]{8}")  # what put() names a file being written


class NotAnImage(ValueError):
    """The bytes are not a PNG, JPEG, WebP or GIF: nothing to keep."""


class Blobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._checked: dict[str, tuple[int, int, int]] = {}

    def prepare(self) -> None:
        """Create the directory and remove temporary files left by a crash (OSError if it
        cannot be made: the caller decides whether that stops anything)."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        if self._tmp.is_symlink():
            return  # never clean up somebody else's directory
        cutoff = time.time() - STALE_TMP_S
        for leftover in self._tmp.iterdir():
            if TEMPORARY.fullmatch(leftover.name) is None:
                continue  # only what put() names: a misconfigured directory loses nothing
            with contextlib.suppress(OSError):
                if leftover.lstat().st_mtime < cutoff:
                    leftover.unlink()

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest[2:4] / digest

    def put(self, data: bytes | bytearray | memoryview) -> Blob:
        """Store ``data`` (NotAnImage, or OSError such as a full disk or a read-only directory)."""
        kind = sniff_image_type(bytes(data[:16]))
        if kind is None:
            raise NotAnImage("the result is not a PNG, JPEG, WebP or GIF image")
        digest = hashlib.sha256(data).hexdigest()
        blob = Blob(digest, len(data), kind)
        target = self.path(digest)
        if self._intact(digest, target):
            return blob
        self._tmp.mkdir(parents=True, exist_ok=True)
        temporary = self._tmp / f"{digest}.{secrets.token_hex(4)}"
        try:
            with temporary.open("xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary.replace(target)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        _fsync_dir(target.parent)
        self._remember(digest, target)
        return replace(blob, written=True)

    def verified(self, digest: str) -> Path | None:
        """The file of ``digest`` if it holds exactly those bytes; a corrupt one is removed."""
        target = self.path(digest)
        return target if self._intact(digest, target) else None

    def read(self, digest: str) -> bytes | None:
        """The bytes of ``digest``, checked; None if missing or corrupt (then removed)."""
        target = self.path(digest)
        try:
            data = target.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            self._discard(digest, target)
            return None
        self._remember(digest, target)
        return data

    def remove_all(self, digests: Iterable[str]) -> list[OSError]:
        """Remove these files (those already gone are no error); why each of those that could
        not be removed stayed (a read-only disk): a deletion is never undone by it."""
        failed = []
        for digest in digests:
            self._checked.pop(digest, None)
            try:
                self.path(digest).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed.append(exc)
        return failed

    def _intact(self, digest: str, target: Path) -> bool:
        try:
            stat = target.stat()
        except OSError:
            return False
        if self._checked.get(digest) == (stat.st_ino, stat.st_size, stat.st_mtime_ns):
            return True
        hasher = hashlib.sha256()
        try:
            with target.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    hasher.update(chunk)
        except OSError:
            return False
        if hasher.hexdigest() != digest:
            self._discard(digest, target)
            return False
        self._remember(digest, target, stat)
        return True

    def _discard(self, digest: str, target: Path) -> None:
        self._checked.pop(digest, None)
        with contextlib.suppress(OSError):
            target.unlink()

    def _remember(self, digest: str, target: Path, stat: os.stat_result | None = None) -> None:
        if stat is None:
            try:
                stat = target.stat()
            except OSError:
                return
        if len(self._checked) >= CHECKED_MAX:
            self._checked.clear()  # checked again on their next read: cheap, and bounded
        self._checked[digest] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
