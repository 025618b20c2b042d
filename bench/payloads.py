"""Upload bodies for scenario 4: 16 PNG-looking 4 MiB images (the PNG magic, then random
bytes: the gateway judges images by their magic bytes only), as multipart ``image[]`` parts and
as one JSON body of ``data:image/png;base64,`` URLs. Written to files, because the load
generator runs in another process.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Upload:
    path: Path
    content_type: str
    body_bytes: int
    image_bytes: int


def images(count: int = 16, size: int = 4 * MIB, seed: int = 8) -> list[bytes]:
    rng = random.Random(seed)
    return [PNG_MAGIC + rng.randbytes(size - len(PNG_MAGIC)) for _ in range(count)]


def multipart(workdir: Path, pictures: list[bytes], prompt: str) -> Upload:
    """A multipart/form-data edits body with one ``image[]`` part per picture."""
    boundary = "bench" + secrets.token_hex(16)
    path = workdir / "upload-multipart.bin"
    with path.open("wb") as out:
        for field, value in (("model", "gpt-image-2"), ("prompt", prompt), ("quality", "medium")):
            out.write(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n'
                f"{value}\r\n".encode()
            )
        for index, picture in enumerate(pictures):
            out.write(
                f'--{boundary}\r\nContent-Disposition: form-data; name="image[]"; '
                f'filename="ref-{index}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
            )
            out.write(picture)
            out.write(b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
    return Upload(
        path,
        f"multipart/form-data; boundary={boundary}",
        path.stat().st_size,
        sum(map(len, pictures)),
    )


def data_urls(workdir: Path, pictures: list[bytes], prompt: str) -> Upload:
    """A JSON edits body carrying the pictures as ``image_urls`` data URLs."""
    path = workdir / "upload-data-urls.json"
    head = {"model": "gpt-image-2", "prompt": prompt, "quality": "medium"}
    with path.open("wb") as out:
        out.write(json.dumps(head)[:-1].encode() + b', "image_urls": [')
        for index, picture in enumerate(pictures):
            out.write(b'"data:image/png;base64,' if not index else b', "data:image/png;base64,')
            out.write(base64.b64encode(picture))
            out.write(b'"')
        out.write(b"]}")
    return Upload(path, "application/json", path.stat().st_size, sum(map(len, pictures)))
