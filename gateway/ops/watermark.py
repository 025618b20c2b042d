"""The watermark file: what this gateway last saw committed, kept outside the database.

Written atomically (a temporary file, fsync, rename, fsync of the folder), so a crash leaves the
old one or the new one, never half of each. Instances sharing a folder keep the further of the
two they race on (``core.restore.further``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from gateway.core.restore import Watermark, further


class WatermarkUnreadable(Exception):
    """The file exists but is not a watermark; the message names it."""


def read(path: Path) -> Watermark | None:
    """The watermark, or None when there is none (a fresh install)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise WatermarkUnreadable(f"cannot read the watermark {path}: {exc.strerror}") from None
    try:
        return Watermark.from_json(text)
    except ValueError as exc:
        raise WatermarkUnreadable(
            f"{path} is not a watermark ({exc}); move it away only if you are sure the ledger "
            "was not restored from an older backup"
        ) from None


def write(path: Path, watermark: Watermark, *, merge: bool = True) -> None:
    """Replace the file with ``watermark``; with ``merge``, keep the file's if it is further
    (``merge=False`` only once a restore was accepted)."""
    if merge:
        with contextlib.suppress(WatermarkUnreadable):
            watermark = further(read(path), watermark)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(watermark.to_json() + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
