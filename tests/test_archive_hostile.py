"""daemon.archive against untrusted input: hostile members, damaged and truncated data."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zstandard
from structlog.testing import capture_logs

from daemon.archive import extract_stream, test_decompress
from daemon.errors import BackupError, EncryptionError, IntegrityError, UnsafeArchiveError

# ------------------------------------------------------------------------------------ builders


def reg(name: str, data: bytes = b"payload", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 1_700_000_000
    return info, data


def special(
    name: str, kind: bytes, *, linkname: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    info.mtime = 1_700_000_000
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, b""


def sym(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return special(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return special(name, tarfile.LNKTYPE, linkname=target)


def dir_(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    return special(name, tarfile.DIRTYPE, mode=mode)


def build(entries: list[tuple[tarfile.TarInfo, bytes]], codec: str = "zstd") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buf.getvalue()
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw)
    if codec == "gzip":
        return gzip.compress(raw, mtime=0)
    return raw


async def chunks_of(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def listing(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def arena(tmp_path: Path) -> tuple[Path, Path]:
    """A sentinel tree beside the staging dir: hostile archives aim at it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("keep me")
    dest = tmp_path / "stage" / "root"
    return tmp_path, dest


def assert_nothing_outside(tmp_path: Path, before: dict[str, bytes | str]) -> None:
    after = {k: v for k, v in listing(tmp_path).items() if k != "stage" and not k.startswith("stage/")}
    assert after == before


# ------------------------------------------------------------------------------ hostile members


Entries = list[tuple[tarfile.TarInfo, bytes]]

# case -> (entries, the member the error must name)
HOSTILE: dict[str, tuple[Entries, str]] = {
    "absolute_path": ([reg("ok.txt"), reg("{outside}/abs_evil.txt")], "{outside}/abs_evil.txt"),
    "dotdot": ([reg("../outside/evil.txt")], "../outside/evil.txt"),
    "dotdot_nested": ([dir_("a"), reg("a/../../outside/evil.txt")], "a/../../outside/evil.txt"),
    "symlink_to_etc": ([sym("etc", "/etc"), reg("etc/evil_passwd")], "etc"),
    "symlink_absolute_outside": ([sym("out", "{outside}"), reg("out/evil.txt")], "out"),
    "symlink_dotdot_escape": ([sym("up", "../../outside"), reg("up/evil.txt")], "up"),
    # each link is harmless alone; together x resolves to dest/../outside
    "symlink_chain": (
        [dir_("a"), dir_("a/b"), sym("a/b/c", "../.."), sym("x", "a/b/c/../outside")],
        "x",
    ),
    # the order tarfile's own data filter misses: x looks inside while c does not exist yet
    "symlink_chain_reversed": ([sym("x", "c/../outside"), sym("c", ".")], "x"),
    "write_through_inner_symlink": (
        [dir_("sub"), sym("link", "sub"), reg("link/evil.txt")],
        "link/evil.txt",
    ),
    "hardlink_absolute": ([hard("h", "/etc/passwd")], "h"),
    "hardlink_dotdot": ([hard("h", "../outside/secret.txt")], "h"),
    "hardlink_to_symlink": ([sym("s", "."), hard("h", "s")], "h"),
    "char_device": ([special("null", tarfile.CHRTYPE)], "null"),
    "block_device": ([special("sda", tarfile.BLKTYPE)], "sda"),
    "fifo": ([special("pipe", tarfile.FIFOTYPE)], "pipe"),
    "replace_dir_with_symlink": ([dir_("d"), reg("d/f"), sym("d", "other")], "d"),
}
NEEDS_FILESYSTEM = {"write_through_inner_symlink", "hardlink_to_symlink", "replace_dir_with_symlink"}


def _expand(
    entries: list[tuple[tarfile.TarInfo, bytes]], outside: Path
) -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    for info, data in entries:
        info = info.replace(
            name=info.name.replace("{outside}", str(outside)),
            linkname=info.linkname.replace("{outside}", str(outside)),
            deep=False,
        )
        out.append((info, data))
    return out


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_member_is_refused_and_nothing_escapes(arena: tuple[Path, Path], case: str) -> None:
    tmp_path, dest = arena
    raw_entries, culprit = HOSTILE[case]
    entries = _expand(raw_entries, tmp_path / "outside")
    culprit = culprit.replace("{outside}", str(tmp_path / "outside"))
    before = listing(tmp_path)
    with capture_logs() as logs, pytest.raises(UnsafeArchiveError) as err:
        await extract_stream(chunks_of(build(entries)), dest)
    assert repr(culprit) in err.value.message, err.value.message
    assert err.value.fix  # the CLI prints message — fix
    assert any(e["event"] == "extract_refused" for e in logs)
    assert_nothing_outside(tmp_path, before)
    # verify refuses what restore refuses (where no filesystem state is needed to tell)
    if case not in NEEDS_FILESYSTEM:
        with pytest.raises(UnsafeArchiveError):
            await test_decompress(chunks_of(build(entries)))


async def test_members_outside_allowed_top_are_refused(arena: tuple[Path, Path]) -> None:
    tmp_path, dest = arena
    data = build([dir_("services"), dir_("services/web"), reg("services/web/a.txt"), reg("traefik/x.yml")])
    with pytest.raises(UnsafeArchiveError, match=r"traefik/x\.yml"):
        await extract_stream(chunks_of(data), dest, allowed_top={"services/web"})
    with pytest.raises(UnsafeArchiveError, match=r"traefik/x\.yml"):
        await test_decompress(chunks_of(data), allowed_top={"services/web"})
    ok = build([dir_("services"), dir_("services/web"), reg("services/web/a.txt")])
    assert (await test_decompress(chunks_of(ok), allowed_top={"services/web"})).member_count == 3
    stats = await extract_stream(chunks_of(ok), tmp_path / "ok", allowed_top={"services/web"})
    assert stats.files == 1 and (tmp_path / "ok/services/web/a.txt").read_bytes() == b"payload"


async def test_select_top_extracts_only_the_chosen_service(tmp_path: Path) -> None:
    """The guide's single services.tar.gz, restoring one service out of it."""
    data = build(
        [
            dir_("services"),
            dir_("services/web"),
            reg("services/web/a"),
            dir_("services/db"),
            reg("services/db/b"),
        ],
        codec="gzip",
    )
    stats = await extract_stream(chunks_of(data), tmp_path / "d", select_top={"services/web"})
    assert listing(tmp_path / "d") == {"services": "dir", "services/web": "dir", "services/web/a": b"payload"}
    assert stats.skipped == 2


# ----------------------------------------------------------------------------------- mode bits


async def test_special_mode_bits_are_stripped_other_bits_kept(tmp_path: Path) -> None:
    entries = [
        dir_("d", 0o1777),  # sticky
        dir_("private", 0o700),
        reg("d/suid", mode=0o4755),
        reg("d/sgid", mode=0o2750),
        reg("d/g_writable", mode=0o664),
        reg("d/read_only", mode=0o444),
        reg("d/secret", mode=0o600),
        reg("d/exec_group_only", mode=0o610),
    ]
    with capture_logs() as logs:
        stats = await extract_stream(chunks_of(build(entries)), tmp_path / "d")
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in (tmp_path / "d").rglob("*")}
    assert modes == {
        "d": 0o777,
        "private": 0o700,
        "suid": 0o755,
        "sgid": 0o750,
        "g_writable": 0o664,
        "read_only": 0o444,
        "secret": 0o600,
        "exec_group_only": 0o610,
    }
    assert sorted(stats.stripped) == ["d", "d/sgid", "d/suid"]
    assert sum(e["event"] == "extract_mode_stripped" for e in logs) == 3


def test_stock_data_filter_would_change_modes_we_keep(tmp_path: Path) -> None:
    """Why extract_stream keeps its own mode handling: the stdlib filter rewrites normal modes."""
    assert hasattr(tarfile, "data_filter")  # Python ≥ 3.11.4: used as a second opinion
    for mode, stock in ((0o664, 0o644), (0o444, 0o644), (0o610, 0o600)):
        info, _ = reg("f", mode=mode)
        assert tarfile.data_filter(info, str(tmp_path)).mode == stock
    info, _ = dir_("d", 0o700)
    assert tarfile.data_filter(info, str(tmp_path)).mode is None  # directory modes dropped


# ------------------------------------------------------------------------------- damaged data


@pytest.fixture(scope="module")
def sample_tar() -> bytes:
    rnd = os.urandom(600_000)
    text = b"".join(b"line %d of a config file\n" % i for i in range(40_000))
    return build(
        [dir_("g"), reg("g/random.bin", rnd), reg("g/text.txt", text), reg("g/small", b"x")], codec="none"
    )


@pytest.mark.parametrize("where", ["magic_only", "quarter", "half", "before_checksum", "last_byte"])
async def test_truncated_zstd_is_an_integrity_error(tmp_path: Path, sample_tar: bytes, where: str) -> None:
    data = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(sample_tar)
    cut = {
        "magic_only": 4,
        "quarter": len(data) // 4,
        "half": len(data) // 2,
        "before_checksum": len(data) - 4,
        "last_byte": len(data) - 1,
    }[where]
    with pytest.raises(IntegrityError, match="truncated"):
        await extract_stream(chunks_of(data[:cut]), tmp_path / "d", codec="zstd")
    with pytest.raises(IntegrityError):
        await test_decompress(chunks_of(data[:cut]), "auto")


async def test_truncated_multithreaded_zstd_is_an_integrity_error(tmp_path: Path, sample_tar: bytes) -> None:
    params = zstandard.ZstdCompressionParameters.from_level(3, threads=2, job_size=1 << 20)
    data = zstandard.ZstdCompressor(compression_params=params).compress(sample_tar * 3)
    for cut in (len(data) - 1, len(data) - 3000):
        with pytest.raises(IntegrityError):
            await test_decompress(chunks_of(data[:cut]), "zstd")


async def test_corrupt_zstd_byte_is_an_integrity_error(tmp_path: Path, sample_tar: bytes) -> None:
    data = bytearray(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(sample_tar))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(IntegrityError):
        await extract_stream(chunks_of(bytes(data)), tmp_path / "d")


async def test_truncated_and_corrupt_gzip_are_integrity_errors(tmp_path: Path, sample_tar: bytes) -> None:
    data = gzip.compress(sample_tar, mtime=0)
    with pytest.raises(IntegrityError):
        await extract_stream(chunks_of(data[: len(data) - 3]), tmp_path / "a")
    broken = bytearray(data)
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(IntegrityError):
        await test_decompress(chunks_of(bytes(broken)), "gzip")


async def test_plain_tar_cut_at_a_member_boundary_is_caught(sample_tar: bytes) -> None:
    # tarfile alone treats EOF between members as a clean end of archive
    with tarfile.open(fileobj=io.BytesIO(sample_tar)) as tar:
        ends = [m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers()]
    boundary = ends[1]
    with pytest.raises(IntegrityError, match="end-of-archive"):
        await test_decompress(chunks_of(sample_tar[:boundary]), "none")
    with pytest.raises(IntegrityError, match="truncated"):
        await test_decompress(chunks_of(sample_tar[: boundary - 100]), "none")


@pytest.mark.parametrize(
    ("payload", "codec", "error"),
    [
        (b"", "auto", IntegrityError),
        (b"this is not an archive at all" * 100, "auto", IntegrityError),
        (b"\x28\xb5\x2f\xfd" + os.urandom(5000), "auto", IntegrityError),
        (b"age-encryption.org/v1\n-> X25519 abc\n", "auto", EncryptionError),
    ],
    ids=["empty", "garbage", "zstd_magic_then_garbage", "age_encrypted"],
)
async def test_not_an_archive_is_a_clear_error(
    tmp_path: Path, payload: bytes, codec: str, error: type[BackupError]
) -> None:
    with pytest.raises(error) as err:
        await extract_stream(chunks_of(payload), tmp_path / "d", codec=codec)  # type: ignore[arg-type]
    assert err.value.message and err.value.fix


async def test_codec_mismatch_is_an_integrity_error(tmp_path: Path, sample_tar: bytes) -> None:
    with pytest.raises(IntegrityError):
        await extract_stream(chunks_of(gzip.compress(sample_tar)), tmp_path / "d", codec="zstd")


async def test_trailing_garbage_after_the_archive_is_caught(sample_tar: bytes) -> None:
    with pytest.raises(IntegrityError, match="after member"):
        await test_decompress(chunks_of(sample_tar[:-2048] + b"\x01" * 2048), "none")


# --------------------------------------------------------------- malformed headers (random access)


def _longname_claiming(size: int) -> bytes:
    """A GNU long-name header whose size field (base-256) claims ``size`` bytes."""
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = 20
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT)[:512])
    header[124:136] = b"\x80" + size.to_bytes(11, "big")
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"n" * 20 + bytes(492) + bytes(1024)


def _sparse_map_reaching_back() -> bytes:
    """pax GNU sparse 1.0 whose map runs past the member's stored data into the next header."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        head = b"2\n0\n5\n10\n"
        data = head + b"0" * (512 - len(head))
        info = tarfile.TarInfo("a/f")
        info.size = len(data)
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.realsize": "17",
            "GNU.sparse.name": "a/f",
        }
        tar.addfile(info, io.BytesIO(data))
        nxt = tarfile.TarInfo("7\nzz")
        nxt.size = 600
        tar.addfile(nxt, io.BytesIO(b"y" * 600))
    return buf.getvalue()


def _sparse_map_unparseable() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a/f")
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.realsize": "10",
            "GNU.sparse.name": "a/f",
        }
        tar.addfile(info, io.BytesIO(b""))
        nxt = tarfile.TarInfo("a/g")
        body = b"1\n0\n5\n" + b"x" * 600
        nxt.size = len(body)
        tar.addfile(nxt, io.BytesIO(body))
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: _longname_claiming(1 << 42),
        _sparse_map_reaching_back,
        _sparse_map_unparseable,
    ],
    ids=["huge_longname", "sparse_map_reaching_back", "sparse_map_unparseable"],
)
@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
async def test_malformed_headers_are_integrity_errors(
    tmp_path: Path, make: Callable[[], bytes], codec: str
) -> None:
    """Neither a MemoryError, a ValueError nor an OSError may escape: a damaged archive, clearly."""
    raw = make()
    data = {
        "zstd": lambda: zstandard.ZstdCompressor(write_checksum=True).compress(raw),
        "gzip": lambda: gzip.compress(raw, mtime=0),
        "none": lambda: raw,
    }[codec]()
    with pytest.raises(IntegrityError):
        await test_decompress(chunks_of(data), codec, check_safety=False)
    with pytest.raises(IntegrityError):
        await extract_stream(chunks_of(data), tmp_path / "d", codec=codec)  # type: ignore[arg-type]
