"""daemon.walfile against WAL files written by real SQLite."""

from __future__ import annotations

import shutil
import sqlite3
import struct
from pathlib import Path

import pytest

from daemon.walfile import (
    FRAME_HEADER_SIZE,
    MAGIC_LE,
    STOP_CHECKSUM_MISMATCH,
    STOP_EOF,
    STOP_NO_HEADER,
    STOP_PARTIAL_FRAME,
    STOP_SALT_MISMATCH,
    WAL_HEADER_SIZE,
    WalFormatError,
    WalHeader,
    apply_frames,
    iter_frames,
    read_wal,
    scan_frames,
    wal_checksum,
)


def open_db(path: Path, page_size: int = 4096) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


def dump(conn: sqlite3.Connection) -> list[str]:
    return sorted(conn.iterdump())


def dump_file(path: Path) -> list[str]:
    c = sqlite3.connect(path)
    try:
        return dump(c)
    finally:
        c.close()


def commit(conn: sqlite3.Connection, *sql: str) -> None:
    conn.execute("BEGIN")
    for s in sql:
        conn.execute(s)
    conn.execute("COMMIT")


@pytest.fixture
def db(tmp_path: Path) -> tuple[Path, sqlite3.Connection]:
    path = tmp_path / "state.db"
    conn = open_db(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    return path, conn


def wal_of(path: Path) -> Path:
    return Path(f"{path}-wal")


def test_header_and_frames_match_sqlite(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    for i in range(20):
        commit(conn, f"INSERT INTO t (v, b) VALUES ('row{i}', randomblob({i * 300}))")
    wal = wal_of(path)
    r = read_wal(wal)
    assert r.header is not None
    assert r.header.magic == MAGIC_LE  # x86/arm64 SQLite writes native (little-endian) checksums
    assert r.header.page_size == 4096
    assert r.header.version == 3007000
    frame_size = FRAME_HEADER_SIZE + 4096
    total_frames = (wal.stat().st_size - WAL_HEADER_SIZE) // frame_size
    assert r.frame_count == total_frames
    assert r.stop_reason == STOP_EOF and r.uncommitted_frames == 0
    assert len(r.transactions) == 21  # CREATE TABLE + 20 inserts
    assert r.transactions[-1].db_size == conn.execute("PRAGMA page_count").fetchone()[0]
    assert r.position is not None and r.position.offset == wal.stat().st_size
    for a, b in zip(r.transactions, r.transactions[1:], strict=False):
        assert a.end == b.start
    assert all(f.commit_size == 0 for t in r.transactions for f in t.frames[:-1])


def test_header_parse_rejects_garbage(db: tuple[Path, sqlite3.Connection]) -> None:
    path, _conn = db
    head = wal_of(path).read_bytes()[:WAL_HEADER_SIZE]
    WalHeader.parse(head)
    with pytest.raises(WalFormatError, match="magic"):
        WalHeader.parse(b"\0" * 32)
    with pytest.raises(WalFormatError, match="checksum"):
        WalHeader.parse(head[:16] + bytes([head[16] ^ 1]) + head[17:])
    built = WalHeader.build(page_size=4096, salt1=1, salt2=2, big_endian=True)
    assert WalHeader.parse(built.to_bytes()) == built


def test_incremental_read_returns_only_new_transactions(
    db: tuple[Path, sqlite3.Connection],
) -> None:
    path, conn = db
    wal = wal_of(path)
    first = read_wal(wal)
    assert first.position is not None and len(first.transactions) == 1
    commit(conn, "INSERT INTO t (v) VALUES ('a')")
    commit(conn, "INSERT INTO t (v) VALUES ('b')", "UPDATE t SET v = 'c' WHERE v = 'a'")
    second = read_wal(wal, first.position)
    assert not second.restarted
    assert len(second.transactions) == 2
    assert second.transactions[0].start == first.position
    again = read_wal(wal, second.position)
    assert again.transactions == [] and again.position == second.position


def test_restart_after_checkpoint_is_reported(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    wal = wal_of(path)
    commit(conn, "INSERT INTO t (v) VALUES ('a')")
    before = read_wal(wal)
    assert before.position is not None
    # RESTART: the next writer reuses the file from the top with new salts (old frames stay behind).
    conn.execute("PRAGMA wal_checkpoint(RESTART)")
    commit(conn, "INSERT INTO t (v) VALUES ('b')")
    after = read_wal(wal, before.position)
    assert after.restarted
    assert after.header is not None and after.header.salt1 != before.position.salt1
    assert len(after.transactions) == 1
    assert after.transactions[0].start.offset == WAL_HEADER_SIZE
    # Frames of the previous incarnation are left in the file; they fail the salt check.
    assert after.stop_reason == STOP_SALT_MISMATCH
    # TRUNCATE leaves an empty file: no header, nothing to read, and that is a restart too.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    empty = read_wal(wal, after.position)
    assert empty.header is None and empty.stop_reason == STOP_NO_HEADER and empty.restarted


def test_corrupt_checksum_stops_at_last_good_commit(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    for i in range(6):
        commit(conn, f"INSERT INTO t (v, b) VALUES ('r{i}', randomblob(5000))")
    wal = wal_of(path)
    good = read_wal(wal)
    victim = good.transactions[4]
    data = bytearray(wal.read_bytes())
    # Flip one byte in the middle of the victim transaction's second frame's page.
    off = victim.frames[1].offset + FRAME_HEADER_SIZE + 1000
    data[off] ^= 0x40
    broken = path.parent / "broken-wal"
    broken.write_bytes(bytes(data))
    r = read_wal(broken)
    assert r.stop_reason == STOP_CHECKSUM_MISMATCH
    assert r.transactions == good.transactions[:4]
    assert r.position == victim.start
    assert r.uncommitted_frames == 1  # the first frame of the victim was still valid


def test_half_written_transaction_is_not_reported(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    for i in range(3):
        commit(conn, f"INSERT INTO t (v, b) VALUES ('r{i}', randomblob(9000))")
    wal = wal_of(path)
    good = read_wal(wal)
    last = good.transactions[-1]
    data = wal.read_bytes()
    # Cut inside the commit frame of the last transaction: its earlier frames are valid but it never
    # committed.
    cut = path.parent / "cut-wal"
    cut.write_bytes(data[: last.frames[-1].offset + 100])
    r = read_wal(cut)
    assert r.transactions == good.transactions[:-1]
    assert r.stop_reason == STOP_PARTIAL_FRAME
    assert r.uncommitted_frames == len(last.frames) - 1


def test_in_flight_spilled_transaction_is_not_reported(
    db: tuple[Path, sqlite3.Connection],
) -> None:
    path, conn = db
    commit(conn, "INSERT INTO t (v) VALUES ('committed')")
    committed = read_wal(wal_of(path))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA cache_size=5")  # a tiny cache makes the writer spill pages into the WAL
    other.execute("BEGIN")
    for i in range(200):
        other.execute("INSERT INTO t (v, b) VALUES (?, randomblob(3000))", (f"x{i}",))
    r = read_wal(wal_of(path))
    assert r.uncommitted_frames > 0, "expected the big transaction to spill frames"
    assert r.transactions == committed.transactions
    other.execute("COMMIT")
    done = read_wal(wal_of(path), r.position)
    assert len(done.transactions) == 1
    other.close()


def test_apply_frames_matches_what_sqlite_sees(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    commit(conn, "INSERT INTO t (v, b) VALUES ('seed', randomblob(100))")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    base = path.parent / "base.db"
    shutil.copyfile(path, base)
    # Page churn: growth, overwrites, deletes (free pages) and a VACUUM that shrinks the file.
    for i in range(30):
        commit(conn, f"INSERT INTO t (v, b) VALUES ('r{i}', randomblob({1000 + i * 400}))")
    commit(conn, "UPDATE t SET v = v || '!' WHERE id % 3 = 0")
    commit(conn, "DELETE FROM t WHERE id % 2 = 0")
    conn.execute("CREATE INDEX t_v ON t (v)")
    conn.execute("VACUUM")
    r = read_wal(wal_of(path))
    assert r.transactions[-1].db_size < max(t.db_size for t in r.transactions)
    out = path.parent / "applied.db"
    shutil.copyfile(base, out)
    n = apply_frames(
        out, iter_frames(r.transactions), r.header.page_size if r.header else 0, r.transactions[-1].db_size
    )
    assert n == r.frame_count
    assert out.stat().st_size == r.transactions[-1].db_size * 4096
    assert dump_file(out) == dump(conn)
    check = sqlite3.connect(out)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()

    # Applying only a prefix of the transactions gives the state as of that commit.
    mid = 12
    out2 = path.parent / "applied-mid.db"
    shutil.copyfile(base, out2)
    apply_frames(out2, iter_frames(r.transactions[:mid]), 4096, r.transactions[mid - 1].db_size)
    rows = sqlite3.connect(out2).execute("SELECT count(*) FROM t").fetchone()[0]
    assert rows == 1 + mid


def _to_big_endian(data: bytes) -> bytes:
    """Re-encode a little-endian-checksum WAL the way a big-endian machine would have written it."""
    h = WalHeader.parse(data)
    nh = WalHeader.build(
        page_size=h.page_size, salt1=h.salt1, salt2=h.salt2, checkpoint_seq=h.checkpoint_seq, big_endian=True
    )
    out = bytearray(nh.to_bytes())
    seed = nh.checksum
    fs = FRAME_HEADER_SIZE + h.page_size
    txns, _, _, _ = scan_frames(data[WAL_HEADER_SIZE:], h.start_position())
    for fr in iter_frames(txns):
        raw = bytearray(fr.raw)
        seed = wal_checksum(bytes(raw[:8]) + bytes(raw[FRAME_HEADER_SIZE:]), True, seed)
        struct.pack_into(">II", raw, 16, *seed)
        out += raw
        assert len(raw) == fs
    return bytes(out)


def test_big_endian_checksums(db: tuple[Path, sqlite3.Connection], tmp_path: Path) -> None:
    path, conn = db
    for i in range(5):
        commit(conn, f"INSERT INTO t (v, b) VALUES ('r{i}', randomblob(3000))")
    le = read_wal(wal_of(path))
    be_bytes = _to_big_endian(wal_of(path).read_bytes())
    # SQLite itself accepts the re-encoded WAL: proof the big-endian checksum is computed right.
    copy_dir = tmp_path / "be"
    copy_dir.mkdir()
    # The main file lacks everything in the WAL (autocheckpoint is off), so SQLite must read the
    # re-encoded WAL to see the rows.
    shutil.copyfile(path, copy_dir / "state.db")
    (copy_dir / "state.db-wal").write_bytes(be_bytes)
    be = read_wal(copy_dir / "state.db-wal")
    assert be.header is not None and be.header.big_endian
    assert [t.db_size for t in be.transactions] == [t.db_size for t in le.transactions]
    assert dump_file(copy_dir / "state.db") == dump(conn)


def test_missing_or_short_file(tmp_path: Path) -> None:
    assert read_wal(tmp_path / "nope-wal").header is None
    (tmp_path / "short-wal").write_bytes(b"\x37\x7f")
    r = read_wal(tmp_path / "short-wal")
    assert r.header is None and r.stop_reason == STOP_NO_HEADER


def test_position_lost_when_frames_before_it_were_rewritten(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    for i in range(3):
        commit(conn, f"INSERT INTO t (v, b) VALUES ('r{i}', randomblob(2000))")
    wal = wal_of(path)
    r = read_wal(wal)
    assert r.position is not None
    assert not read_wal(wal, r.position).position_lost
    data = bytearray(wal.read_bytes())
    last = r.transactions[-1].frames[-1]
    # Same salts, other content: what SQLite writes after a crash rolled our frames back.
    data[last.offset + 16] ^= 0xFF  # the running checksum stored in that frame's header
    rewritten = path.parent / "rewritten-wal"
    rewritten.write_bytes(bytes(data))
    lost = read_wal(rewritten, r.position)
    assert lost.position_lost and lost.transactions == []
    # Shorter than the position with the same header: also gone.
    short = path.parent / "short2-wal"
    short.write_bytes(bytes(data[: last.offset]))
    assert read_wal(short, r.position).position_lost
