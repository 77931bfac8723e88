"""age encryption against the real S3 server: no plaintext leaves the machine, restores round-trip,
the age CLI reads every object, wrong keys fail before anything live changes, the loop never stalls."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pyrage
import pytest

from daemon.backup import BackupJob
from daemon.config import Config, parse_config
from daemon.crypto import (
    AGE_HEADER,
    CHANNEL_LIMIT,
    Decryptor,
    Encryptor,
    StreamStats,
    decryptor_from_config,
    encryptor_from_config,
    generate_keypair,
    load_identities,
    write_new_identity,
)
from daemon.errors import EncryptionError, IntegrityError
from daemon.manifest import list_backups
from daemon.restore import RestoreJob
from daemon.storage import S3Storage
from daemon.verify import verify_backup
from tests.conftest import run_cli
from tests.helpers.rootfactory import RootInfo, db_dump, make_root, tree_digest
from tests.helpers.s3server import MotoServer
from tests.helpers.tinyserved import DB_FILES as DB
from tests.helpers.tinyserved import cfg_for as tinyserved_cfg
from tests.helpers.tinyserved import ctl_calls

MiB = 1024 * 1024


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RootInfo:
    monkeypatch.setenv("FAKE_TINYSERVED_STATE", str(tmp_path / "tinyserved.state"))
    return make_root(tmp_path / "tinyserve", size="tiny", seed=23)


@pytest.fixture
def key(tmp_path: Path) -> tuple[str, Path]:
    """(recipient, identity file) of a fresh key pair, written the way `keygen` writes it."""
    kp = generate_keypair()
    path = tmp_path / "keys" / "age-identity.txt"
    write_new_identity(path, kp)
    return kp.recipient, path


def cfg_for(root: Path, recipient: str | None = None, identity: Path | None = None) -> Config:
    enc = ""
    if recipient or identity:
        enc = "encryption:\n"
        if recipient:
            enc += f"  recipients: [{recipient}]\n"
        if identity:
            enc += f"  identity_file: {identity}\n"
    return tinyserved_cfg(root, enc)


def snapshot(root: Path) -> tuple[dict[str, object], list[str]]:
    return tree_digest(root, exclude=[*DB, "logs", "*.pre-restore", "*.pre-restore/*"]), db_dump(
        root / "state.db"
    )


def at(hour: int) -> datetime:
    return datetime(2026, 1, 10, hour, 0, 0, tzinfo=UTC)


async def source(total: int, chunk: int = MiB, seed: int = 1) -> AsyncIterator[bytes]:
    block = hashlib.shake_256(f"block{seed}".encode()).digest(chunk)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield block[:n]
        sent += n


def age_cli(args: list[str], data: bytes) -> bytes:
    return subprocess.run(["age", *args], input=data, capture_output=True, check=True).stdout


def by_hand(obj: bytes, identity: Path, then: list[str] | None = None) -> bytes:
    """`age -d -i KEY | zstd -d [| then]`, with the standard tools only."""
    out = subprocess.run(
        ["zstd", "-d", "-c"], input=age_cli(["-d", "-i", str(identity)], obj), capture_output=True, check=True
    ).stdout
    if then:
        out = subprocess.run(then, input=out, capture_output=True, check=True).stdout
    return out


async def no_age_threads_left() -> None:
    for t in [t for t in threading.enumerate() if t.name.startswith("age-")]:
        await asyncio.to_thread(t.join, 5)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("age-")]


needs_age = pytest.mark.skipif(
    shutil.which("age") is None, reason="the age CLI is not installed (.ci/run installs it)"
)


# --------------------------------------------------------------------------------------------
# Backups through the real S3 server
# --------------------------------------------------------------------------------------------


async def test_full_backup_encrypts_every_object_and_restores_exactly(
    root: RootInfo, s3_storage: S3Storage, key: tuple[str, Path]
) -> None:
    recipient, identity = key
    cfg = cfg_for(root.path, recipient, identity)
    before = snapshot(root.path)
    res = await BackupJob(cfg, s3_storage, encryptor=encryptor_from_config(cfg)).run("full")
    objs = await s3_storage.list(f"full/{res.timestamp}/")
    names = sorted(o.key.split("/", 2)[2] for o in objs)
    assert "manifest.json" in names and "images.tar.zst.age" in names and "services/blog.tar.zst.age" in names
    secrets_ = [s.encode() for s in root.secrets]
    identity_text = identity.read_bytes()
    secret_key = next(line for line in identity_text.splitlines() if line.startswith(b"AGE-SECRET-KEY-"))
    for o in objs:
        data = await s3_storage.get_bytes(o.key)
        for s in [*secrets_, secret_key]:
            assert s not in data, f"{s[:12]!r}… found in {o.key}"
        if o.key.endswith("/manifest.json"):
            manifest = json.loads(data)  # still readable without a key
        else:
            assert o.key.endswith(".age")
            assert data.startswith(AGE_HEADER), o.key
    assert {e["encryption"] for e in manifest["objects"]} == {"age"}
    assert all(e["name"].endswith(".age") for e in manifest["objects"])
    refs = await list_backups(s3_storage)
    assert [r.summary()["encrypted"] for r in refs] == [True]

    # without the key (best kept elsewhere) verify checks the stored bytes; with it, the contents
    no_key = await verify_backup(s3_storage, refs[0])
    assert no_key.ok and all(o.sealed and o.verified for o in no_key.objects)
    from daemon.verify import raise_if_damaged

    raise_if_damaged([no_key])
    deep = await verify_backup(s3_storage, refs[0], deep=True)  # a restore test: needs the key
    assert not deep.ok and all(o.key_problem for o in deep.objects)
    from daemon.errors import EncryptionError

    with pytest.raises(EncryptionError, match="could not be checked"):
        raise_if_damaged([deep])
    assert (await verify_backup(s3_storage, refs[0], decryptor=decryptor_from_config(cfg))).ok
    sealed = next(e for e in refs[0].manifest.objects if e.name.startswith("configs"))
    blob = bytearray(await s3_storage.get_bytes(refs[0].key(sealed.name)))
    blob[-1] ^= 1  # one bit of the stored object flipped: caught without the key
    await s3_storage.put_bytes(refs[0].key(sealed.name), bytes(blob))
    damaged = await verify_backup(s3_storage, refs[0])
    assert [o.name for o in damaged.objects if not o.ok] == [sealed.name]
    with pytest.raises(IntegrityError, match="damaged object"):
        raise_if_damaged([damaged])
    await s3_storage.put_bytes(refs[0].key(sealed.name), bytes(blob[:-1]) + bytes([blob[-1] ^ 1]))

    # restore into a wiped root (and a wiped Docker store)
    shutil.rmtree(root.path)
    shutil.rmtree(os.environ["FAKE_DOCKER_STATE"])
    out = await RestoreJob(cfg, s3_storage, decryptor=decryptor_from_config(cfg)).run(res.timestamp)
    assert out.integrity == "ok"
    assert snapshot(root.path) == before
    assert sorted(out.images_loaded) == sorted(root.images)


@needs_age
async def test_age_cli_decrypts_objects(
    root: RootInfo, s3_storage: S3Storage, key: tuple[str, Path], tmp_path: Path
) -> None:
    recipient, identity = key
    cfg = cfg_for(root.path, recipient)
    res = await BackupJob(cfg, s3_storage, encryptor=encryptor_from_config(cfg)).run("partial")
    prefix = f"partial/{res.timestamp}/"
    configs = await s3_storage.get_bytes(prefix + "configs.tar.zst.age")
    # exactly what the README tells a person to do: age -d -i KEY | zstd -d | tar -t
    members = (await asyncio.to_thread(by_hand, configs, identity, ["tar", "-t", "-f", "-"])).decode().split()
    assert "traefik/acme.json" in members
    assert f"cloudflared/{root.tunnel_id}.json" in members
    db = tmp_path / "by-hand.db"
    db_object = await s3_storage.get_bytes(prefix + "state.db.zst.age")
    db.write_bytes(await asyncio.to_thread(by_hand, db_object, identity))
    assert db_dump(db) == db_dump(root.db_path)


async def test_wrong_identity_fails_before_anything_live_changes(
    root: RootInfo, s3_storage: S3Storage, key: tuple[str, Path], tmp_path: Path
) -> None:
    recipient, _identity = key
    cfg = cfg_for(root.path, recipient)
    res = await BackupJob(cfg, s3_storage, encryptor=encryptor_from_config(cfg)).run("full")
    other = tmp_path / "other-key.txt"
    write_new_identity(other, generate_keypair())
    (root.path / "generated" / "marker").write_text("live")
    live = snapshot(root.path)
    beside = sorted(p.name for p in root.path.parent.iterdir())
    wrong = Decryptor.from_file(other)
    with pytest.raises(EncryptionError) as ei:
        await RestoreJob(cfg, s3_storage, decryptor=wrong).run(res.timestamp)
    assert "no key in identity file" in ei.value.message and str(other) in ei.value.message
    assert "AGE-SECRET-KEY" not in ei.value.one_line()
    assert snapshot(root.path) == live
    assert ctl_calls() == []  # tinyserved never stopped
    assert sorted(p.name for p in root.path.parent.iterdir()) == beside  # no staging left behind
    # and without any identity: refused up front, same guarantees
    with pytest.raises(EncryptionError, match="no identity is configured"):
        await RestoreJob(cfg, s3_storage, decryptor=None).run(res.timestamp)
    assert snapshot(root.path) == live and ctl_calls() == []


async def test_damaged_ciphertext_is_an_integrity_error_in_restore(
    root: RootInfo, s3_storage: S3Storage, key: tuple[str, Path]
) -> None:
    recipient, identity = key
    cfg = cfg_for(root.path, recipient, identity)
    res = await BackupJob(cfg, s3_storage, encryptor=encryptor_from_config(cfg)).run("partial")
    prefix = f"partial/{res.timestamp}/"
    name = "configs.tar.zst.age"
    data = await s3_storage.get_bytes(prefix + name)
    damaged = data[: len(data) - 40]  # truncated in its last chunk
    await s3_storage.put_bytes(prefix + name, damaged)
    # re-seal the manifest so only age itself can notice
    manifest = json.loads(await s3_storage.get_bytes(prefix + "manifest.json"))
    for o in manifest["objects"]:
        if o["name"] == name:
            o["size"], o["sha256"] = len(damaged), hashlib.sha256(damaged).hexdigest()
    await s3_storage.put_bytes(prefix + "manifest.json", json.dumps(manifest).encode())
    live = snapshot(root.path)
    with pytest.raises(IntegrityError, match="damaged or truncated"):
        await RestoreJob(cfg, s3_storage, decryptor=decryptor_from_config(cfg)).run(res.timestamp)
    assert snapshot(root.path) == live and ctl_calls() == []
    check = await verify_backup(
        s3_storage, (await list_backups(s3_storage))[0], decryptor=decryptor_from_config(cfg)
    )
    assert [o.name for o in check.objects if not o.ok] == [name]


async def test_mixed_history_lists_and_restores(
    root: RootInfo, s3_storage: S3Storage, key: tuple[str, Path]
) -> None:
    recipient, identity = key
    plain_cfg = cfg_for(root.path, identity=identity)  # identity only: old backups stay readable
    enc_cfg = cfg_for(root.path, recipient, identity)
    before_plain = snapshot(root.path)
    r1 = await BackupJob(plain_cfg, s3_storage, now=lambda: at(1)).run("partial")
    (root.path / "generated" / "added-later.txt").write_text("second state\n")
    before_enc = snapshot(root.path)
    r2 = await BackupJob(
        enc_cfg, s3_storage, encryptor=encryptor_from_config(enc_cfg), now=lambda: at(2)
    ).run("partial")
    refs = await list_backups(s3_storage)
    assert [(r.timestamp, r.summary()["encrypted"]) for r in refs] == [
        (r1.timestamp, False),
        (r2.timestamp, True),
    ]
    dec = decryptor_from_config(enc_cfg)
    await RestoreJob(enc_cfg, s3_storage, decryptor=dec).run(r1.timestamp)
    assert snapshot(root.path) == before_plain
    await RestoreJob(enc_cfg, s3_storage, decryptor=dec).run(r2.timestamp)
    assert snapshot(root.path) == before_enc
    # the unencrypted one needs no key at all
    await RestoreJob(cfg_for(root.path), s3_storage).run(r1.timestamp)
    assert snapshot(root.path) == before_plain


async def test_cli_keygen_create_list_restore(
    tmp_path: Path, s3_server: MotoServer, bucket: str, root: RootInfo
) -> None:
    keyfile = tmp_path / "secure" / "backup-key.txt"
    res = run_cli("keygen", "--output", str(keyfile))
    assert res.returncode == 0, res.stderr
    assert (keyfile.stat().st_mode & 0o777) == 0o600
    recipient = next(w for w in res.stdout.split() if w.startswith("age1"))
    assert "somewhere other than this machine" in res.stdout and "password" in res.stdout
    assert f"    - {recipient}" in res.stdout and f"identity_file: {keyfile}" in res.stdout
    assert "AGE-SECRET-KEY" not in res.stdout
    assert load_identities(keyfile)
    again = run_cli("keygen", "--output", str(keyfile))
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert recipient in keyfile.read_text()  # the old key is untouched

    cfgp = tmp_path / "cfg.yaml"
    base = (
        f"root: {root.path}\n"
        f"destination:\n  url: s3://{bucket}/tb\n  endpoint: {s3_server.endpoint}\n  addressing_style: path\n"
        "tinyserved:\n  stop: [tinyserved-ctl, stop]\n  start: [tinyserved-ctl, start]\n"
    )
    cfgp.write_text(base + f"encryption:\n  recipients:\n    - {recipient}\n  identity_file: {keyfile}\n")
    res = run_cli("--config", str(cfgp), "create", "--partial", "--json")
    assert res.returncode == 0, res.stderr
    ts = json.loads(res.stdout)["timestamp"]

    keyfile.chmod(0o644)
    res = run_cli("--config", str(cfgp), "restore", ts, "--yes")
    assert res.returncode == 7 and "chmod 600" in res.stderr and "Traceback" not in res.stderr
    keyfile.chmod(0o600)
    (root.path / "generated" / "docker-compose.yml").write_text("services: {}\n")
    res = run_cli("--config", str(cfgp), "restore", ts, "--yes")
    assert res.returncode == 0, res.stderr
    assert "services: {}" not in (root.path / "generated" / "docker-compose.yml").read_text()


# --------------------------------------------------------------------------------------------
# Keys and identity files
# --------------------------------------------------------------------------------------------


def test_identity_file_must_be_private(key: tuple[str, Path]) -> None:
    recipient, identity = key
    identity.chmod(0o644)
    with pytest.raises(EncryptionError) as ei:
        Decryptor.from_file(identity)
    assert "readable by other users" in ei.value.message and "0644" in ei.value.message
    assert ei.value.fix == f"run `chmod 600 {identity}`"
    identity.chmod(0o640)
    with pytest.raises(EncryptionError) as ei:
        decryptor_from_config(cfg_for(Path("/nonexistent"), recipient, identity))
    assert "0640" in ei.value.one_line() and "chmod 600" in ei.value.one_line()
    identity.chmod(0o600)
    assert decryptor_from_config(cfg_for(Path("/nonexistent"), recipient, identity)) is not None
    with pytest.raises(EncryptionError, match="does not exist"):
        Decryptor.from_file(identity.with_name("missing.txt"))


def test_identity_file_formats(tmp_path: Path) -> None:
    def private(name: str, text: str | bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        p.chmod(0o600)
        return p

    a, b = generate_keypair(), generate_keypair()
    # several keys with comments and blank lines (age-keygen layout); CRLF too
    two = private(
        "two.txt", f"# created: x\r\n# public key: {a.recipient}\r\n{a.identity}\r\n\r\n# b\n{b.identity}\n"
    )
    dec = Decryptor.from_file(two)
    for kp in (a, b):
        assert dec.decrypt_bytes(Encryptor([kp.recipient]).encrypt_bytes(b"hi")) == b"hi"
    for name, text, expect in [
        ("empty.txt", "# nothing here\n", "holds no key"),
        ("junk.txt", f"{a.identity}\nnot a key\n", "line 2"),
        ("damaged.txt", a.identity[:-3] + "QQQ\n", "damaged age secret key"),
        ("plugin.txt", "AGE-PLUGIN-YUBIKEY-1ABCDEF\n", "plugin"),
        ("wrapped.txt", "age-encryption.org/v1\n-> scrypt abc 18\n", "passphrase-encrypted"),
    ]:
        with pytest.raises(EncryptionError, match=expect) as ei:
            Decryptor.from_file(private(name, text))
        assert a.identity not in ei.value.one_line()

    if shutil.which("ssh-keygen") is None:
        return
    for kind in ("ed25519", "rsa"):
        kf = tmp_path / f"id_{kind}"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(kf)], check=True)
        pub = (tmp_path / f"id_{kind}.pub").read_text().strip()
        enc = encryptor_from_config(parse_config(f"encryption:\n  recipients: ['{pub}']\n"))
        assert enc is not None
        assert Decryptor.from_file(kf).decrypt_bytes(enc.encrypt_bytes(b"ssh works")) == b"ssh works"
    locked = tmp_path / "id_locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pass phrase", "-f", str(locked)], check=True)
    with pytest.raises(EncryptionError, match="passphrase"):
        Decryptor.from_file(locked)


def test_recipients_from_config() -> None:
    assert encryptor_from_config(parse_config("{}")) is None
    assert decryptor_from_config(parse_config("{}")) is None
    kp = generate_keypair()
    enc = encryptor_from_config(parse_config(f"encryption:\n  recipients: [{kp.recipient}]\n"))
    assert enc is not None and enc.recipients == [kp.recipient]
    with pytest.raises(EncryptionError, match="not a valid public key"):
        encryptor_from_config(parse_config("encryption:\n  recipients: [age1notreallyakey]\n"))
    with pytest.raises(EncryptionError, match="not a valid public key"):
        encryptor_from_config(parse_config("encryption:\n  recipients: ['ssh-ed25519 AAAAnope']\n"))


@needs_age
def test_keys_interoperate_with_age_cli(tmp_path: Path, key: tuple[str, Path]) -> None:
    recipient, identity = key
    # ours → age CLI, age CLI → ours, and an age-keygen key file read by us
    ct = Encryptor([recipient]).encrypt_bytes(b"to the CLI")
    assert age_cli(["-d", "-i", str(identity)], ct) == b"to the CLI"
    ct = age_cli(["-r", recipient], b"from the CLI")
    assert Decryptor.from_file(identity).decrypt_bytes(ct) == b"from the CLI"
    if shutil.which("age-keygen"):
        kf = tmp_path / "age-keygen.txt"
        subprocess.run(["age-keygen", "-o", str(kf)], check=True, capture_output=True)
        kf.chmod(0o600)
        pub = subprocess.run(["age-keygen", "-y", str(kf)], check=True, capture_output=True, text=True).stdout
        ct = Encryptor([pub.strip()]).encrypt_bytes(b"keygen file")
        assert Decryptor.from_file(kf).decrypt_bytes(ct) == b"keygen file"


# --------------------------------------------------------------------------------------------
# Streams: bounded memory, a responsive loop, clean failure
# --------------------------------------------------------------------------------------------


def _pair() -> tuple[Encryptor, Decryptor]:
    kp = generate_keypair()
    return Encryptor([kp.recipient]), Decryptor([pyrage.x25519.Identity.from_str(kp.identity)])


async def test_large_stream_round_trip_with_bounded_buffers() -> None:
    enc, dec = _pair()
    total = 64 * MiB
    est, dst = StreamStats(), StreamStats()
    expect = hashlib.sha256()
    async for c in source(total):
        expect.update(c)
    got = hashlib.sha256()
    n = 0
    async for c in dec.decrypt_stream(enc.encrypt_stream(source(total), stats=est), stats=dst):
        got.update(c)
        n += len(c)
    assert n == total and got.hexdigest() == expect.hexdigest()
    assert est.bytes_in == total and dst.bytes_out == total
    assert est.bytes_out == dst.bytes_in > total  # age adds a header and 16 bytes per 64 KiB
    # what each stream held between the loop and its worker, whatever the size: a few MiB
    bound = 2 * CHANNEL_LIMIT + 2 * MiB + 64 * 1024  # chunks of 1 MiB; see daemon.crypto
    assert 0 < est.peak_buffered <= bound
    assert 0 < dst.peak_buffered <= bound
    assert est.buffered == 0 and dst.buffered == 0


async def test_event_loop_stays_responsive_while_encrypting() -> None:
    enc, dec = _pair()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    n = 0
    async for c in dec.decrypt_stream(enc.encrypt_stream(source(64 * MiB, chunk=4 * MiB))):
        n += len(c)
    stop.set()
    await t
    assert n == 64 * MiB
    assert len(gaps) > 10
    assert max(gaps) < 0.2, f"event loop stalled for {max(gaps):.3f} s"


async def test_damaged_streams_and_wrong_keys() -> None:
    enc, dec = _pair()
    ct = b"".join([c async for c in enc.encrypt_stream(source(300_000, chunk=50_000))])

    async def feed(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 70_000):
            yield data[i : i + 70_000]

    async def drain(data: bytes, d: Decryptor = dec) -> bytes:
        return b"".join([c async for c in d.decrypt_stream(feed(data), what="obj.age")])

    assert len(await drain(ct)) == 300_000
    flipped = bytearray(ct)
    flipped[len(ct) // 2] ^= 1
    cases = {
        "truncated": ct[:-10],
        "cut at a chunk boundary": ct[: len(ct) - (len(ct) - 200) % 65552],
        "flipped bit": bytes(flipped),
        "trailing garbage": ct + b"xx",
        "not age at all": b"\x28\xb5\x2f\xfd" + b"\0" * 500,
        "empty": b"",
    }
    for label, data in cases.items():
        with pytest.raises(IntegrityError) as ei:
            await drain(data)
        assert "obj.age" in ei.value.message, label
    _, other = _pair()
    with pytest.raises(EncryptionError, match="no key in"):
        await drain(ct, other)
    with pytest.raises(EncryptionError):
        other.decrypt_bytes(ct)
    with pytest.raises(IntegrityError):
        dec.decrypt_bytes(ct[:-1])


async def test_source_errors_pass_through_and_workers_end() -> None:
    enc, dec = _pair()
    closed = asyncio.Event()

    async def failing() -> AsyncIterator[bytes]:
        try:
            yield b"a" * MiB
            yield b"b" * MiB
            raise IntegrityError("the download does not match its sha256")
        finally:
            closed.set()

    # the source's own error comes out, not a wrapped age error
    with pytest.raises(IntegrityError, match="sha256"):
        async for _ in enc.encrypt_stream(failing()):
            pass
    # a consumer that stops early: the worker thread ends and the source is closed
    closed.clear()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"z" * MiB
        finally:
            closed.set()

    stream = enc.encrypt_stream(endless())
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(closed.wait(), 5)
    await no_age_threads_left()
    # and a cancelled consumer leaves nothing running either
    closed.clear()

    async def consume() -> None:
        async for _ in dec.decrypt_stream(enc.encrypt_stream(endless())):
            await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(closed.wait(), 5)
    await no_age_threads_left()


@needs_age
def test_bytes_and_file_hooks_for_wal(tmp_path: Path, key: tuple[str, Path]) -> None:
    recipient, identity = key
    enc = Encryptor([recipient])
    dec = Decryptor.from_file(identity)
    for size in (0, 1, 100_000, 3 * MiB + 5):
        data = hashlib.shake_256(str(size).encode()).digest(size) if size else b""
        ct = enc(data)  # Encryptor/Decryptor are plain Callable[[bytes], bytes] hooks too
        assert ct.startswith(AGE_HEADER)
        assert dec(ct) == data
        assert age_cli(["-d", "-i", str(identity)], ct) == data
    src = tmp_path / "snap.zst"
    src.write_bytes(hashlib.shake_256(b"snap").digest(2 * MiB + 7))
    enc.encrypt_file(src, tmp_path / "snap.zst.age")
    assert (tmp_path / "snap.zst.age").read_bytes().startswith(AGE_HEADER)
    dec.decrypt_file(tmp_path / "snap.zst.age", tmp_path / "back.zst")
    assert (tmp_path / "back.zst").read_bytes() == src.read_bytes()
    (tmp_path / "cut.age").write_bytes((tmp_path / "snap.zst.age").read_bytes()[:-100])
    with pytest.raises(IntegrityError):
        dec.decrypt_file(tmp_path / "cut.age", tmp_path / "partial.out")
    assert not (tmp_path / "partial.out").exists()
