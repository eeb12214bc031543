"""The sync engine in memory: two nodes' engines and services over a MemoryLink (no sockets),
so a test can see which requests a pass sends."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest

from ironsync.protocol import GetChunkList, GetChunks, GetFiles
from ironsync.store import index
from ironsync.sync import fullsync
from ironsync.sync.fullsync import SyncEngine
from ironsync.sync.service import SyncService
from tests.conftest import Node
from tests.daemons import tree, write
from tests.memlink import MemoryLink


def engine_of(node: Node) -> tuple[SyncEngine, SyncService]:
    config, db = node.config(), node.db()
    engine = SyncEngine(db, config)
    engine.scan()
    return engine, SyncService(db, config, engine)


def test_new_files_come_whole_in_batches_and_copies_and_edits_by_chunks(tmp_path: Path) -> None:
    """Issue 13: new files of at most 4 MiB whose content is held nowhere here come whole, many
    per GetFiles; a copy of content held here and an edit of a file here go by chunks, and
    cost only what differs."""
    rng = random.Random(13)
    alpha, beta = Node(tmp_path, "alpha"), Node(tmp_path, "beta")
    old, kept = rng.randbytes(2_000_000), rng.randbytes(1_500_000)
    write(alpha.root, "old.bin", old)
    write(alpha.root, "keep.bin", kept)
    (engine_a, service_a), (engine_b, _) = engine_of(alpha), engine_of(beta)

    async def pull() -> MemoryLink:
        link = MemoryLink("alpha", service_a, local_id="beta", peer_storages=("docs",))
        report = await engine_b.pull_from(link, ["docs"])
        assert not report.failed, report.failed
        return link

    asyncio.run(pull())  # beta gets both files
    fresh = rng.randbytes(3_000_000)
    write(alpha.root, "fresh.bin", fresh)
    for n in range(40):
        write(alpha.root, f"small/{n}.txt", rng.randbytes(rng.randint(0, 9000)))
    write(alpha.root, "copy.bin", kept)
    write(alpha.root, "old.bin", old[:1_000_000] + os.urandom(1000) + old[1_000_000:])
    engine_a.scan()

    link = asyncio.run(pull())

    assert tree(beta.root) == tree(alpha.root)
    asked = [r for r in link.requests if isinstance(r, GetFiles | GetChunkList | GetChunks)]
    whole = [p for r in asked if isinstance(r, GetFiles) for p in r.paths]
    assert sorted(whole) == sorted(["fresh.bin", *(f"small/{n}.txt" for n in range(40))])
    assert len([r for r in asked if isinstance(r, GetFiles)]) <= 2  # batches, not a file each
    by_chunks = {r.path for r in asked if isinstance(r, GetChunkList)}
    assert by_chunks == {"copy.bin", "old.bin"}
    fetched = sum(len(r.chunks) for r in asked if isinstance(r, GetChunks))
    assert fetched <= 4  # old.bin's changed chunks; copy.bin's are all here


def test_a_pulled_file_the_index_did_not_record_before_a_crash_keeps_the_peers_version(
    tmp_path: Path,
) -> None:
    """A crash between a group's renames and its transaction leaves the peer's content on
    disk and no index row (ironsync.sync.commit). The next scan records the peer's version,
    not a new one of ours: the peer's next change of the file is then no conflict."""
    alpha, beta = Node(tmp_path, "alpha"), Node(tmp_path, "beta")
    write(alpha.root, "f.txt", "version one")
    (engine_a, service_a), (engine_b, _) = engine_of(alpha), engine_of(beta)

    async def pull() -> None:
        link = MemoryLink("alpha", service_a, local_id="beta", peer_storages=("docs",))
        report = await engine_b.pull_from(link, ["docs"])
        assert not report.failed, report.failed

    asyncio.run(pull())
    db = engine_b.db
    with db.atomic():  # what the crash lost: the row the group's transaction would have written
        db.execute("DELETE FROM files WHERE path = 'f.txt'")
    engine_b.scan()
    row = index.get_file(db, index.get_storage(db, "docs").id, "f.txt")  # type: ignore[union-attr]
    assert row is not None and (row.version, row.modified_by) == ('{"alpha":1}', "alpha")
    write(alpha.root, "f.txt", "version two")
    engine_a.scan()
    asyncio.run(pull())
    assert tree(beta.root) == {"f.txt": b"version two"}  # no conflict copy


def test_a_file_changed_here_between_its_decision_and_its_window_is_decided_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass keeps only the paths of the files it will fetch and decides them again when
    their window comes (memory flat in the number of files). A file written here after the
    first decision is then no plain pull any more: this pass leaves it as it is, counts it as
    changed, and the next pass settles it as a conflict, losing neither side."""
    monkeypatch.setattr(fullsync, "PULL_WINDOW", 4)
    alpha, beta = Node(tmp_path, "alpha"), Node(tmp_path, "beta")
    for n in range(10):
        write(alpha.root, f"f{n}.txt", f"alpha's {n}")
    (_, service_a), (engine_b, _) = engine_of(alpha), engine_of(beta)
    windows: list[list[str]] = []
    pull_many = engine_b._pull_many

    async def first_window_then_an_edit(*args: Any) -> None:
        windows.append(sorted(p.path for p in args[3]))
        await pull_many(*args)
        if len(windows) == 1:
            write(beta.root, "f9.txt", "beta's own")
            engine_b.scan()

    monkeypatch.setattr(engine_b, "_pull_many", first_window_then_an_edit)

    async def pull() -> int:
        link = MemoryLink("alpha", service_a, local_id="beta", peer_storages=("docs",))
        report = await engine_b.pull_from(link, ["docs"])
        assert not report.failed, report.failed
        return report.changed

    changed = asyncio.run(pull())

    assert windows == [
        ["f0.txt", "f1.txt", "f2.txt", "f3.txt"],
        ["f4.txt", "f5.txt", "f6.txt", "f7.txt"],
        ["f8.txt"],
    ]
    assert changed >= 1
    assert (beta.root / "f9.txt").read_text() == "beta's own"
    assert all((beta.root / f"f{n}.txt").read_text() == f"alpha's {n}" for n in range(9))

    asyncio.run(pull())  # the next pass: a conflict, both contents kept

    contents = sorted(p.read_text() for p in beta.root.rglob("f9*") if p.is_file())
    assert contents == ["alpha's 9", "beta's own"]


def test_a_file_changed_here_just_before_its_group_switches_is_kept_and_read_once_per_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's checks read its paths' index rows at once, under the lock, right before
    they run: a file written and scanned here after its temp file was written is left as
    it is (the pull fails as changed locally); the others switch. No check queries its row
    alone."""
    alpha, beta = Node(tmp_path, "alpha"), Node(tmp_path, "beta")
    for n in range(10):
        write(alpha.root, f"f{n}.txt", f"alpha's {n}")
    (_, service_a), (engine_b, _) = engine_of(alpha), engine_of(beta)
    checking = engine_b.committer.checking
    single_reads: list[str] = []
    get_file = index.get_file

    def counted_get_file(db: Any, storage_id: int, path: str) -> Any:
        single_reads.append(path)
        return get_file(db, storage_id, path)

    def edit_then_check(items: list[Any]) -> Any:
        if not (beta.root / "f5.txt").exists():
            write(beta.root, "f5.txt", "beta's own")
            engine_b.scan()
        single_reads.clear()
        monkeypatch.setattr(index, "get_file", counted_get_file)
        return checking(items)

    monkeypatch.setattr(engine_b.committer, "checking", edit_then_check)

    async def pull() -> fullsync.PullReport:
        link = MemoryLink("alpha", service_a, local_id="beta", peer_storages=("docs",))
        return await engine_b.pull_from(link, ["docs"])

    report = asyncio.run(pull())
    monkeypatch.setattr(index, "get_file", get_file)

    assert (beta.root / "f5.txt").read_text() == "beta's own"
    assert all((beta.root / f"f{n}.txt").read_text() == f"alpha's {n}" for n in range(10) if n != 5)
    assert (report.pulled, report.changed, report.failed) == (9, 10, [])  # changed: 9 + f5
    assert not [p for p in single_reads if p.startswith("f")], single_reads


def test_a_tree_of_folders_and_links_is_made_in_batches_and_one_bad_entry_fails_alone(
    tmp_path: Path,
) -> None:
    """A pass makes folders and links in batches (fullsync.CREATE_BATCH at a time, one flush
    and one transaction each): every entry of a tree larger than a batch arrives with its
    mode, and an entry that cannot be made here fails alone, reported with its reason."""
    alpha, beta = Node(tmp_path, "alpha"), Node(tmp_path, "beta")
    for n in range(fullsync.CREATE_BATCH + 40):
        folder = alpha.root / f"d{n // 20:02}" / f"sub{n:03}"
        folder.mkdir(parents=True)
        if n % 7 == 0:
            (folder / "link").symlink_to(f"../sub{n:03}")
    (alpha.root / "d00" / "sub005").chmod(0o750)
    (alpha.root / "d01" / "sub021" / "blocked").mkdir()
    (_, service_a), (engine_b, _) = engine_of(alpha), engine_of(beta)
    (beta.root / "d01" / "sub021").mkdir(parents=True)  # not indexed yet: taken as it is
    (beta.root / "d01" / "sub021" / "blocked").write_text("beta's, not indexed")

    async def pull() -> fullsync.PullReport:
        link = MemoryLink("alpha", service_a, local_id="beta", peer_storages=("docs",))
        return await engine_b.pull_from(link, ["docs"])

    report = asyncio.run(pull())

    assert [path for path, _ in report.failed] == ["docs:d01/sub021/blocked"], report.failed
    assert (beta.root / "d01" / "sub021" / "blocked").read_text() == "beta's, not indexed"
    made, wanted = (
        sorted(
            str(p.relative_to(node.root))
            for p in node.root.rglob("*")
            if p.name != "blocked" and not p.relative_to(node.root).parts[0].startswith(".")
        )
        for node in (beta, alpha)
    )
    assert made == wanted and len(made) > fullsync.CREATE_BATCH
    assert (beta.root / "d00" / "sub005").stat().st_mode & 0o777 == 0o750
    assert os.readlink(beta.root / "d00" / "sub007" / "link") == "../sub007"
    db = engine_b.db
    rows = db.query("SELECT count(*) FROM files WHERE type IN ('dir', 'symlink') AND deleted = 0")
    assert rows[0][0] == len(made)
    failed = db.query("SELECT path FROM events WHERE kind = 'write_failed'")
    assert failed == [("d01/sub021/blocked",)]
