"""The result store's index: one contract, answered alike by SQLite, PostgreSQL and the
in-memory engine the service's tests may use; and the content-addressed directory."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.store.blobs import Blobs, NotAnImage
from gateway.store.results import Blob, Deletion, ResultImage, ResultIndex
from tests.conftest import GIF, JPEG, PNG, WEBP
from tests.ledgers import migrated_store


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ResultIndex]:
    async with migrated_store(request.param, request, tmp_path / "gateway.db") as store:
        yield store.results


def image(request_id: str, position: int = 0, *, team: str = "design", images: int = 1,
          created_at: float = 1000.0, reuse_key: str | None = "k") -> ResultImage:  # fmt: skip
    url = f"https://files.example/{request_id}-{position}.png"
    key = hashlib.sha256(url.encode()).hexdigest()
    return ResultImage(request_id, position, team, "default", url, key, reuse_key, images,
                       created_at)  # fmt: skip


def blob(name: str, size: int = 100) -> Blob:
    return Blob(hashlib.sha256(name.encode()).hexdigest(), size, "image/png")


async def test_images_are_recorded_then_stored(index: ResultIndex) -> None:
    first, second = image("r1", 0, images=2), image("r1", 1, images=2)
    await index.add([first, second])
    await index.add([first])  # recording twice changes nothing
    assert [i.position for i in await index.of_request("r1")] == [0, 1]
    assert await index.stored("r1", 0, blob("a"), 1001.0)
    assert await index.stored("r1", 1, blob("b", 50), 1001.0)
    found = await index.by_url(second.url_sha256)
    assert found is not None and found.digest == blob("b").digest and found.bytes == 50
    assert found.kind == "image/png" and found.stored_at == 1001.0
    assert await index.by_url("0" * 64) is None
    totals = await index.totals()
    assert (totals.images, totals.bytes) == (2, 150)


async def test_identical_bytes_count_once_in_the_totals(index: ResultIndex) -> None:
    await index.add([image("r1"), image("r2")])
    await index.stored("r1", 0, blob("same"), 1.0)
    await index.stored("r2", 0, blob("same"), 1.0)
    totals = await index.totals()
    assert (totals.images, totals.bytes) == (2, 100)


async def test_reusable_needs_every_image_stored_and_none_deleted(index: ResultIndex) -> None:
    await index.add([image("r1", 0, images=2), image("r1", 1, images=2)])
    await index.stored("r1", 0, blob("a"), 1.0)
    assert await index.reusable("design", "k", 0.0) is None  # one of two stored
    await index.stored("r1", 1, blob("b"), 1.0)
    assert await index.reusable("design", "k", 0.0) == "r1"
    assert await index.reusable("design", "k", 1000.5) is None  # outside the window
    assert await index.reusable("ops", "k", 0.0) is None  # another team
    assert await index.reusable("design", "other", 0.0) is None
    await index.add([image("r2", created_at=2000.0)])
    await index.stored("r2", 0, blob("c"), 1.0)
    assert await index.reusable("design", "k", 0.0) == "r2"  # the newest
    await index.delete(Deletion(request_id="r2"), 3000.0)
    assert await index.reusable("design", "k", 0.0) == "r1"


async def test_delete_narrows_by_request_team_and_age(index: ResultIndex) -> None:
    await index.add([
        image("old", team="design", created_at=100.0),
        image("new", team="design", created_at=500.0),
        image("ops", team="ops", created_at=100.0),
    ])  # fmt: skip
    for request_id in ("old", "new", "ops"):
        await index.stored(request_id, 0, blob(request_id), 1.0)
    gone = await index.delete(Deletion(team="design", before=200.0), 900.0)
    assert [g.request_id for g in gone] == ["old"]
    assert gone[0].deleted_at is None  # the row as it was
    (old,) = await index.of_request("old")
    assert old.deleted_at == 900.0 and not old.live
    assert await index.delete(Deletion(team="design", before=200.0), 901.0) == []
    assert not await index.stored("old", 0, blob("again"), 902.0)  # deleted stays deleted
    await index.add([image("old")])
    assert (await index.of_request("old"))[0].deleted_at == 900.0
    assert await index.live_digests([blob("old").digest, blob("new").digest]) == {
        blob("new").digest
    }
    gone = await index.delete(Deletion(), 950.0)
    assert sorted(g.request_id for g in gone) == ["new", "ops"]
    assert (await index.totals()).images == 0


async def test_oldest_lists_live_stored_images_first_in_line(index: ResultIndex) -> None:
    await index.add([image("b", created_at=200.0), image("a", created_at=100.0),
                     image("c", created_at=50.0)])  # fmt: skip
    await index.stored("a", 0, blob("a"), 1.0)
    await index.stored("b", 0, blob("b"), 1.0)  # c is not stored: nothing on disk to free
    assert [i.request_id for i in await index.oldest(10)] == ["a", "b"]
    assert [i.request_id for i in await index.oldest(1)] == ["a"]


# -- the directory -----------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "kind"), [(PNG, "image/png"), (JPEG, "image/jpeg"),
                                            (WEBP, "image/webp"), (GIF, "image/gif")])  # fmt: skip
def test_blobs_are_named_by_their_digest_and_typed_by_magic(
    tmp_path: Path, data: bytes, kind: str
) -> None:
    blobs = Blobs(tmp_path / "results")
    blobs.prepare()
    stored = blobs.put(data)
    assert stored == Blob(hashlib.sha256(data).hexdigest(), len(data), kind)
    path = blobs.path(stored.digest)
    assert path.read_bytes() == data and path.parent.parent.parent == tmp_path / "results"
    assert blobs.put(data) == stored  # stored once
    assert list((tmp_path / "results" / "tmp").iterdir()) == []


def test_blobs_refuse_what_is_not_an_image(tmp_path: Path) -> None:
    blobs = Blobs(tmp_path)
    with pytest.raises(NotAnImage):
        blobs.put(b"<html>not found</html>")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_a_corrupt_blob_is_found_and_removed(tmp_path: Path) -> None:
    blobs = Blobs(tmp_path)
    stored = blobs.put(PNG)
    assert blobs.verified(stored.digest) == blobs.path(stored.digest)
    blobs.path(stored.digest).write_bytes(PNG[:-1] + b"\x00")
    assert blobs.verified(stored.digest) is None
    assert not blobs.path(stored.digest).exists()
    stored = blobs.put(PNG)
    blobs.path(stored.digest).write_bytes(PNG[:10])
    assert blobs.read(stored.digest) is None
    assert blobs.read(blobs.put(PNG).digest) == PNG


def test_start_up_cleans_only_its_own_stale_temporary_files(tmp_path: Path) -> None:
    """Only names ``put`` gives, and never through a symbolic link: a ``directory`` set to a
    shared place, or a planted ``tmp`` link, loses nothing."""
    old = time.time() - 2 * 3600
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    os.utime(victim / "precious", (old, old))
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "tmp").symlink_to(victim)
    Blobs(linked).prepare()
    assert (victim / "precious").exists()

    root = tmp_path / "results"
    (root / "tmp").mkdir(parents=True)
    leftover = root / "tmp" / f"{'a' * 64}.0badf00d"
    other = root / "tmp" / "notes.txt"
    fresh = root / "tmp" / f"{'b' * 64}.12345678"
    for path in (leftover, other, fresh):
        path.write_bytes(b"x")
    for path in (leftover, other):
        os.utime(path, (old, old))
    Blobs(root).prepare()
    assert (leftover.exists(), other.exists(), fresh.exists()) == (False, True, True)


def test_a_file_that_cannot_be_removed_is_named_not_raised(tmp_path: Path) -> None:
    blobs = Blobs(tmp_path / "results")
    stored = blobs.put(PNG)
    stuck = "c" * 64
    blobs.path(stuck).mkdir(parents=True)  # unlink fails, as on a read-only disk (even as root)
    failed = blobs.remove_all([stored.digest, stuck, "0" * 64])
    assert [type(e) for e in failed] == [IsADirectoryError]
    assert not blobs.path(stored.digest).exists()


def test_a_read_only_directory_fails_the_write_only(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("in the way")
    blobs = Blobs(blocked)
    with pytest.raises(OSError):
        blobs.prepare()
    with pytest.raises(OSError):
        blobs.put(PNG)
    assert blocked.read_text() == "in the way"


async def test_unstored_lists_live_images_never_stored_oldest_first(index: ResultIndex) -> None:
    await index.add([image("r2", created_at=3000.0), image("r1", 0, images=2, created_at=2000.0),
                     image("r1", 1, images=2, created_at=2000.0), image("r0", created_at=10.0)])  # fmt: skip
    await index.stored("r1", 0, blob("a"), 2001.0)
    assert [(i.request_id, i.position) for i in await index.unstored(1000.0, 10)] == [
        ("r1", 1),
        ("r2", 0),
    ]
    await index.delete(Deletion(request_id="r2"), 3001.0)
    assert [i.request_id for i in await index.unstored(1000.0, 10)] == ["r1"]
    assert await index.unstored(1000.0, 0) == []


async def test_deleted_since_names_the_files_to_remove(index: ResultIndex) -> None:
    await index.add([image("a"), image("b"), image("c")])
    for name in "abc":
        await index.stored(name, 0, blob(name), 1.0)
    await index.delete(Deletion(request_id="a"), 100.0)
    await index.delete(Deletion(request_id="b"), 200.0)
    assert await index.deleted_since(0.0) == sorted([blob("a").digest, blob("b").digest])
    assert await index.deleted_since(150.0) == [blob("b").digest]
    many = [blob(str(n)).digest for n in range(1200)]  # more than one statement's worth
    assert await index.live_digests([*many, blob("c").digest]) == {blob("c").digest}
