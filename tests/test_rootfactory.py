"""The test helpers themselves: the root factory, tree/db descriptions, the guide's scripts, the fakes."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import guide
from tests.helpers.rootfactory import (
    DB_FILES,
    FAKES_DIR,
    db_dump,
    db_rows,
    diff_trees,
    fake_path,
    make_root,
    parse_size,
    read_calls,
    tree_digest,
)

GUIDE_TEXT = Path("/work/shared/seeds/000_6528b876c8ee9ec2.txt")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_root_has_everything_a_tinyserve_root_has(tmp_path: Path) -> None:
    info = make_root(tmp_path / "root", seed=3, docker_state=tmp_path / "docker")
    r = info.path
    for rel in ("generated", "backups", "services", "traefik", "cloudflared", "logs"):
        assert (r / rel).is_dir(), rel
    assert (r / "generated/docker-compose.yml").is_file()
    assert (r / "generated/traefik/traefik.yml").is_file()
    assert (r / "generated/cloudflared/config.yml").is_file()
    assert list((r / "backups").glob("*/docker-compose.yml"))

    # secrets: known values, only in their 0600 files
    assert info.tls_secret == "SECRET-TLS-KEY-3" and info.tunnel_secret == "SECRET-TUNNEL-3"
    assert info.secret_files == [r / "traefik/acme.json", r / f"cloudflared/{info.tunnel_id}.json"]
    assert info.tls_secret in (r / "traefik/acme.json").read_text()
    assert json.loads(info.secret_files[1].read_text())["TunnelSecret"] == info.tunnel_secret
    for p in info.secret_files:
        assert mode(p) == 0o600
    holders = {
        p.relative_to(r).as_posix()
        for p in r.rglob("*")
        if p.is_file() and not p.is_symlink() and any(s.encode() in p.read_bytes() for s in info.secrets)
    }
    assert holders == {"traefik/acme.json", f"cloudflared/{info.tunnel_id}.json"}

    # services: nested dirs, empty dirs, relative links, unicode names, modes, own SQLite
    assert info.services == ["blog", "photos", "notes"]
    blog = r / "services/blog"
    assert os.readlink(blog / "current") == "content/posts/2025" and (blog / "current").is_dir()
    assert os.readlink(blog / "latest.md") == "content/posts/2025/02/second-post.md"
    assert (blog / "latest.md").read_text().startswith("# second-post")
    assert list((blog / "cache").iterdir()) == []
    assert (blog / "café" / "naïve-日本.txt").read_text(encoding="utf-8").startswith("unicode")
    assert mode(blog / "config.json") == 0o640 and mode(blog / "bin/entrypoint.sh") == 0o755
    assert mode(r / "services/notes/private") == 0o700 and mode(r / "services/photos/uploads") == 0o775
    for db in (
        blog / "data/blog.sqlite",
        r / "services/photos/data/photos.db",
        r / "services/notes/notes.db",
    ):
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("SELECT count(*) FROM items").fetchone()[0] > 0

    # images named by the compose file exist in the stand-in store
    assert info.images == sorted(set(info.image_ids))
    assert len(info.images) == 3
    compose = (r / "generated/docker-compose.yml").read_text()
    for image in info.images:
        assert re.search(rf"^\s+image: {re.escape(image)}$", compose, re.M)  # the guide's grep finds it
    assert (tmp_path / "docker" / "tags.json").exists()


def test_state_db_is_wal_with_uncheckpointed_frames_and_no_open_connection(tmp_path: Path) -> None:
    info = make_root(tmp_path / "root", size="tiny")
    r = info.path
    assert (r / "state.db-wal").stat().st_size > 32
    assert not (r / "state.db-shm").exists()
    assert info.db_rows == {"settings": 9, "services": 3, "tunnel": 1, "deployments": 340}
    # the committed rows at the end live only in the WAL: the main file alone lacks them
    main_only = tmp_path / "main-only.db"
    shutil.copyfile(r / "state.db", main_only)
    with sqlite3.connect(main_only) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM deployments").fetchone()[0] == 300
        assert conn.execute("SELECT value FROM settings WHERE key='theme'").fetchone()[0] == "dark"
    with_wal = db_rows(info.db_path, "settings")
    assert ("theme", "light", "2026-01-02T00:00:00Z") in with_wal
    assert len(db_rows(info.db_path, "deployments")) == 340
    assert [row[1] for row in db_rows(info.db_path, "tunnel")] == [info.tunnel_id]

    # reading never touches the live files
    before = tree_digest(r, mtimes=True)
    dump = db_dump(info.db_path)
    assert tree_digest(r, mtimes=True) == before
    assert any("INSERT INTO \"settings\" VALUES('last_deploy'" in line for line in dump)

    cold = make_root(tmp_path / "cold", size="tiny", hot_wal=False)
    assert not (cold.path / "state.db-wal").exists()
    assert cold.db_rows["deployments"] == 300


def test_tree_digest_is_stable_and_make_root_reproducible(tmp_path: Path) -> None:
    a = make_root(tmp_path / "a", size="tiny", seed=11, docker_state=tmp_path / "da")
    b = make_root(tmp_path / "b", size="tiny", seed=11, docker_state=tmp_path / "db")
    da = tree_digest(a.path, mtimes=True)
    assert tree_digest(a.path, mtimes=True) == da
    # same seed, same tree (but for the WAL, whose salts SQLite draws at random)
    wal_free = ["state.db-wal"]
    assert (
        diff_trees(
            tree_digest(a.path, exclude=wal_free, mtimes=True),
            tree_digest(b.path, exclude=wal_free, mtimes=True),
        )
        == []
    )
    assert db_dump(a.db_path) == db_dump(b.db_path)
    assert a.image_ids == b.image_ids and a.tunnel_id == b.tunnel_id
    other = make_root(tmp_path / "c", size="tiny", seed=12)
    assert other.tunnel_id != a.tunnel_id and db_dump(other.db_path) != db_dump(a.db_path)

    entry = da["services/blog/current"]
    assert entry == {"type": "symlink", "target": "content/posts/2025"}
    assert da["services/blog/cache"]["type"] == "dir" and da["services/blog/cache"]["mode"] == 0o755
    assert da["traefik/acme.json"]["mode"] == 0o600 and len(da["traefik/acme.json"]["sha256"]) == 64
    assert "services/blog/café/naïve-日本.txt" in da
    assert not any(k.startswith("state.db") for k in tree_digest(a.path, exclude=DB_FILES))
    assert not any(k.startswith("logs") for k in tree_digest(a.path, exclude=["logs"]))


def test_tree_digest_sees_every_kind_of_change(tmp_path: Path) -> None:
    info = make_root(tmp_path / "root", size="tiny")
    r = info.path
    before = tree_digest(r)
    (r / "services/blog/config.json").chmod(0o600)
    (r / "services/notes/attachments/todo.md").write_text("changed\n")
    (r / "services/blog/current").unlink()
    (r / "services/blog/current").symlink_to("content")
    (r / "services/blog/new-empty").mkdir()
    shutil.rmtree(r / "services/photos/uploads")
    diff = diff_trees(before, tree_digest(r))
    assert diff == [
        "differs: services/blog/config.json: mode 416 != 384",
        "differs: services/blog/current: target 'content/posts/2025' != 'content'",
        "only in second: services/blog/new-empty dir",
        "differs: services/notes/attachments/todo.md: sha256 "
        + f"{before['services/notes/attachments/todo.md']['sha256']!r} != "
        + f"{tree_digest(r)['services/notes/attachments/todo.md']['sha256']!r}, size "
        + f"{before['services/notes/attachments/todo.md']['size']} != 8",
        "only in first: services/photos/uploads dir",
    ]


def test_size_knob_scales_the_root(tmp_path: Path) -> None:
    assert parse_size("200MB") == 200_000_000 and parse_size("2GiB") == 2 * 1024**3
    assert parse_size(12345) == 12345 and parse_size("small") == 1024 * 1024
    with pytest.raises(ValueError):
        parse_size("huge")
    info = make_root(tmp_path / "root", size="12MB", docker_state=tmp_path / "docker")
    on_disk = sum(p.stat().st_size for p in info.path.rglob("*") if p.is_file() and not p.is_symlink())
    layers = sum(p.stat().st_size for p in (tmp_path / "docker/blobs/sha256").iterdir())
    assert 0.85 * 12e6 < on_disk + layers < 1.2 * 12e6
    assert 0.2 < layers / (on_disk + layers) < 0.4
    assert abs(info.size_bytes - (on_disk + layers)) < 0.15 * 12e6
    with pytest.raises(FileExistsError):
        make_root(info.path)


# ------------------------------------------------------------------------------------------------
# The guide's scripts


@pytest.mark.skipif(not GUIDE_TEXT.exists(), reason="the guide is not beside this checkout")
def test_guide_scripts_are_verbatim() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE_TEXT.read_text(), re.S)
    assert guide.GUIDE_FULL in blocks
    assert guide.GUIDE_PARTIAL in blocks
    assert guide.GUIDE_RESTORE in blocks


@pytest.mark.parametrize("kind", ["full", "partial", "restore"])
def test_guide_scripts_differ_only_by_marked_deviations(kind: str, tmp_path: Path) -> None:
    original = {"full": guide.GUIDE_FULL, "partial": guide.GUIDE_PARTIAL, "restore": guide.GUIDE_RESTORE}[
        kind
    ]
    patched = guide.guide_script(kind)  # type: ignore[arg-type]
    removed = [line for line in original.splitlines() if line not in patched.splitlines()]
    added = [line for line in patched.splitlines() if line not in original.splitlines()]
    comments = [line for line in added if line.startswith("# DEVIATION from the guide:")]
    assert len(removed) == len(comments) - (1 if kind != "partial" else 0)  # the sleep shim adds a line
    assert all(line.startswith(("TINYSERVE_ROOT=", "TIMESTAMP=")) for line in removed)
    script = guide.write_guide_scripts(tmp_path)[kind]
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


async def test_guide_full_backup_and_restore_round_trip(
    tmp_path: Path, s3_server: object, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("aws") is None:
        pytest.skip("the AWS CLI (the guide's uploader) is not installed")
    env = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,  # type: ignore[attr-defined]
        "FAKE_DOCKER_STATE": str(tmp_path / "docker"),
        "FAKE_TINYSERVED_STATE": str(tmp_path / "tinyserved"),
    }
    info = make_root(tmp_path / "root", size="tiny", docker_state=tmp_path / "docker")
    before = tree_digest(info.path, exclude=[*DB_FILES, "logs"], mtimes=True)
    dump = db_dump(info.db_path)

    run = await guide.run_guide_backup_async(
        "full", info.path, bucket, "gb", env, timestamp="2026-01-10T12-00-00Z", hold_db_open=True
    )
    assert run.timestamp == "2026-01-10T12-00-00Z" and run.key_prefix("gb") == "gb/full/2026-01-10T12-00-00Z/"
    shutil.rmtree(info.path)
    info.path.mkdir()
    shutil.rmtree(tmp_path / "docker")
    restored = await guide.run_guide_restore_async(run.timestamp, "full", info.path, bucket, "gb", env)
    assert "Loaded image: traefik:v3.1" in restored.stdout and "tinyserved: running" in restored.stdout
    assert diff_trees(before, tree_digest(info.path, exclude=[*DB_FILES, "logs"], mtimes=True)) == []
    assert db_dump(info.db_path) == dump
    calls = [(c["prog"], c["args"][0]) for c in read_calls(os.environ["FAKE_CALLS_LOG"])]
    assert calls[:2] == [("launchctl", "unload"), ("docker", "save")]
    assert ("docker", "load") in calls and calls[-2:] == [("launchctl", "load"), ("tinyserve", "status")]


# ------------------------------------------------------------------------------------------------
# The other stand-ins


def run_fake(
    name: str, *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PATH": fake_path(), **(env or {})}
    return subprocess.run([name, *args], capture_output=True, text=True, input=input, env=full, timeout=30)


def test_security_keeps_secrets_out_of_argv(tmp_path: Path) -> None:
    env = {"FAKE_SECURITY_STATE": str(tmp_path / "kc"), "FAKE_CALLS_LOG": str(tmp_path / "calls.log")}
    secret = "s3cr3t with spaces"
    p = run_fake(
        "security",
        "add-generic-password",
        "-a",
        "AKIA1",
        "-s",
        "tsb",
        "-w",
        input=f"{secret}\n{secret}\n",
        env=env,
    )
    assert p.returncode == 0, p.stderr
    p = run_fake("security", "add-generic-password", "-a", "AKIA1", "-s", "tsb", "-w", input="x\n", env=env)
    assert p.returncode == 45  # exists, no -U
    p = run_fake(
        "security", "-i", input='add-generic-password -U -a AKIA1 -s tsb -w "new \\"one\\""\n', env=env
    )
    assert p.returncode == 0, p.stderr
    p = run_fake("security", "find-generic-password", "-a", "AKIA1", "-s", "tsb", "-w", env=env)
    assert (p.returncode, p.stdout) == (0, 'new "one"\n')
    p = run_fake("security", "find-generic-password", "-s", "tsb", env=env)
    assert '"acct"<blob>="AKIA1"' in p.stdout
    assert run_fake("security", "delete-generic-password", "-s", "tsb", env=env).returncode == 0
    assert run_fake("security", "find-generic-password", "-s", "tsb", "-w", env=env).returncode == 44
    log = (tmp_path / "calls.log").read_text()
    assert "s3cr3t" not in log and "new" not in log
    assert len(read_calls(tmp_path / "calls.log", "security")) == 7


def test_service_control_fakes_record_calls_and_track_tinyserved(tmp_path: Path) -> None:
    env = {"FAKE_CALLS_LOG": str(tmp_path / "calls.log"), "FAKE_TINYSERVED_STATE": str(tmp_path / "ts")}
    assert run_fake("launchctl", "bootout", "gui/501/dev.tinyserve.daemon", env=env).returncode == 0
    assert run_fake("tinyserve", "status", env=env).returncode == 3
    p = run_fake(
        "launchctl", "bootstrap", "gui/501", "x.plist", env={**env, "FAKE_LAUNCHCTL_EXIT_BOOTSTRAP": "5"}
    )
    assert p.returncode == 5 and p.stderr
    assert run_fake("tinyserved-ctl", "start", env=env).returncode == 0
    p = run_fake("tinyserve", "status", env=env)
    assert p.returncode == 0 and "running" in p.stdout
    assert run_fake("systemctl", "--user", "stop", "tinyserved.service", env=env).returncode == 0
    assert run_fake("systemctl", "--user", "is-active", "tinyserved.service", env=env).stdout == "inactive\n"
    assert run_fake("tinyserve", "version", env=env).stdout == "0.9.0-fake\n"
    assert [(c["prog"], c["args"][0]) for c in read_calls(tmp_path / "calls.log")] == [
        ("launchctl", "bootout"),
        ("tinyserve", "status"),
        ("launchctl", "bootstrap"),
        ("tinyserved-ctl", "start"),
        ("tinyserve", "status"),
        ("systemctl", "--user"),
        ("systemctl", "--user"),
        ("tinyserve", "version"),
    ]
    for name in ("docker", "launchctl", "security", "systemctl", "tinyserve", "tinyserved-ctl"):
        exe = FAKES_DIR / name
        assert os.access(exe, os.X_OK) and exe.read_text().startswith("#!/usr/bin/env python3\n")
