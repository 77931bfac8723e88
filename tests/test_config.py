"""Config loading, validation messages, round-trip edits, and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from daemon.config import Config, edit_config, load_config, parse_config
from daemon.errors import ConfigError
from daemon.scheduler import cron_dow_to_apscheduler, parse_cron
from tests.conftest import run_cli
from tests.helpers.s3server import MotoServer, free_port


def test_defaults_follow_the_guide() -> None:
    cfg = parse_config("")
    assert cfg.schedule.partial == "0 3 * * 1-6"
    assert cfg.schedule.full == "0 3 * * 0"
    assert cfg.retention.partial.max_age_days == 7
    assert cfg.retention.full.max_age_days == 28
    assert cfg.wal.retention_hours == 24
    assert cfg.destination.scheme == "file"


def test_schedule_off_in_any_spelling() -> None:
    cfg = parse_config("schedule:\n  full: off\n  partial: 'off'\n  services: false\n")
    assert cfg.schedule.full is None and cfg.schedule.partial is None and cfg.schedule.services is None


def test_env_and_home_expansion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MYROOT", str(tmp_path / "r"))
    cfg = parse_config("root: $MYROOT/x\nlogging:\n  file: ~/l.log\n")
    assert cfg.root == tmp_path / "r" / "x"
    assert cfg.logging.file == Path(os.path.expanduser("~/l.log"))
    monkeypatch.setenv("TINYSERVE_ROOT", str(tmp_path / "env-root"))
    assert parse_config("root: /elsewhere").root == tmp_path / "env-root"


def test_hostname_in_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "mac-mini.local")
    cfg = parse_config("destination:\n  url: s3://bkt/tiny/{hostname}\n")
    assert cfg.destination.bucket == "bkt"
    assert cfg.destination.prefix == "tiny/mac-mini"
    assert cfg.destination.resolved_url == "s3://bkt/tiny/mac-mini"
    cfg = parse_config("destination:\n  url: file:///Volumes/B/{hostname}\n")
    assert cfg.destination.resolved_url == "file:///Volumes/B/mac-mini"


def test_unknown_key_suggests() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config("schedule:\n  parital: '0 3 * * *'\n")
    line = ei.value.one_line()
    assert "schedule.parital" in line and "did you mean `schedule.partial`" in line and "line 2" in line
    with pytest.raises(ConfigError) as ei:
        parse_config("destinaton:\n  url: s3://a/b\n")
    assert "did you mean `destination`" in ei.value.one_line()


def test_yaml_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config("root: /x\nschedule:\n  partial: [0 3\n  full: x\n")
    assert "line" in ei.value.message and "YAML syntax error" in ei.value.message


@pytest.mark.parametrize(
    "text, needle",
    [
        ("schedule:\n  full: '61 3 * * *'\n", "schedule.full"),
        ("schedule:\n  full: '0 3 * *'\n", "5 fields"),
        ("destination:\n  url: ftp://x/y\n", "unknown destination scheme"),
        ("destination:\n  endpoint: not-a-url\n", "endpoint"),
        ("schedule:\n  timezone: Mars/Olympus\n", "time zone"),
        ("encryption:\n  recipients: [nope]\n", "age recipient"),
    ],
)
def test_invalid_values(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    assert needle in ei.value.one_line()


def test_every_wrong_key_is_named_at_once_and_union_tags_are_not_keys() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config("retention:\n  full:\n    keep_lats: 3\nschedule:\n  ful: 'off'\n")
    line = ei.value.one_line()
    assert line.startswith("unknown config key `retention.full.keep_lats` (config, line 3)")
    assert "also wrong: `schedule.ful`" in line and "keep_last" in line
    with pytest.raises(ConfigError) as ei:
        parse_config("hooks:\n  blog:\n    pre: {run: x}\n")
    line = ei.value.one_line()
    assert line.startswith("invalid `hooks.blog.pre` (config, line 3)") and "list[str]" not in line
    assert "also wrong" not in line  # both union members' errors are one problem


def test_a_block_given_twice_is_refused_not_half_dropped() -> None:
    text = "wal:\n  retention_hours: 48\nschedule:\n  timezone: UTC\nwal:\n  debounce_ms: 10\n"
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "c.yaml")
    assert ei.value.one_line() == (
        "`wal` is given twice in c.yaml (lines 1 and 5); YAML would silently keep only the second "
        "— merge the two into one block"
    )
    with pytest.raises(ConfigError, match="`full` is given twice"):
        parse_config("retention:\n  full: {keep_last: 2}\n  full: {keep_last: 3}\n")


def test_yaml_merge_keys_are_not_keys_given_twice() -> None:
    cfg = parse_config(
        "hooks:\n  blog: &h {pre: [echo, a], timeout_seconds: 30}\n  notes: {<<: *h, post: [echo, b]}\n"
    )
    assert cfg.hooks["notes"].pre == ["echo", "a"] and cfg.hooks["notes"].post == ["echo", "b"]


def test_editing_a_config_with_a_block_given_twice_names_it(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("wal:\n  retention_hours: 48\nwal:\n  debounce_ms: 10\n")
    res = run_cli("--config", str(p), "schedule", "--full-weekly")
    _assert_one_line_error(res, f"`wal` is given twice in {p} (lines 1 and 3)")
    assert p.read_text() == "wal:\n  retention_hours: 48\nwal:\n  debounce_ms: 10\n"


def test_cron_sunday_is_zero_and_seven() -> None:
    assert cron_dow_to_apscheduler("0", "x") == "sun"
    assert cron_dow_to_apscheduler("7", "x") == "sun"
    assert cron_dow_to_apscheduler("1-6", "x") == "mon,tue,wed,thu,fri,sat"
    assert cron_dow_to_apscheduler("5-7", "x") == "sun,fri,sat"
    assert cron_dow_to_apscheduler("sat,sun", "x") == "sun,sat"
    from datetime import datetime
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("UTC")
    trig = parse_cron("0 3 * * 0", tz)
    # 2026-11-26 is a Thursday; the next Sunday is the 29th.
    nxt = trig.get_next_fire_time(None, datetime(2026, 11, 26, 12, 0, tzinfo=tz))
    assert nxt == datetime(2026, 11, 29, 3, 0, tzinfo=tz)
    trig = parse_cron("0 3 * * 1-6", tz)
    nxt = trig.get_next_fire_time(None, datetime(2026, 11, 28, 12, 0, tzinfo=tz))  # Saturday noon
    assert nxt == datetime(2026, 11, 30, 3, 0, tzinfo=tz)  # Monday, not Sunday


def test_edit_keeps_comments_and_order(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("# my notes\nroot: /srv/ts   # where it lives\nschedule:\n  full: '0 4 * * 0'  # late\n")
    edit_config(p, {"schedule.partial": "0 2 * * *", "destination.url": "s3://b/p"})
    text = p.read_text()
    assert "# my notes" in text and "# where it lives" in text and "# late" in text
    assert text.index("root:") < text.index("schedule:")
    cfg = load_config(p)
    assert cfg.schedule.partial == "0 2 * * *" and cfg.schedule.full == "0 4 * * 0"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_edit_refuses_invalid(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("schedule:\n  full: '0 4 * * 0'\n")
    with pytest.raises(ConfigError):
        edit_config(p, {"schedule.full": "bad cron"})
    assert "0 4 * * 0" in p.read_text()


def test_example_config_is_valid() -> None:
    from daemon.config import example_config_text

    cfg = parse_config(example_config_text())
    assert isinstance(cfg, Config)


# ---- the CLI: one clear line, non-zero exit, no traceback, no secret ---------------------------


def _assert_one_line_error(res: object, needle: str) -> None:
    stderr = res.stderr  # type: ignore[attr-defined]
    assert res.returncode != 0, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr and "Traceback" not in res.stdout  # type: ignore[attr-defined]
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert " — " in lines[0]  # names the fix


def test_cli_missing_config(tmp_path: Path) -> None:
    res = run_cli("--config", str(tmp_path / "nope.yaml"), "list")
    _assert_one_line_error(res, "does not exist")
    assert "tinyserve-backup config" in res.stderr


@pytest.mark.parametrize(
    "text, needle",
    [
        ("root: /x\n  bad: [\n", "YAML syntax error"),
        ("rooot: /x\n", "did you mean `root`"),
        ("schedule:\n  partial: every day\n", "cron"),
        ("destination:\n  url: gs://bucket/x\n", "unknown destination scheme"),
    ],
    ids=["malformed-yaml", "unknown-key", "invalid-cron", "unknown-scheme"],
)
def test_cli_bad_config_is_one_clear_line(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    _assert_one_line_error(run_cli("--config", str(p), "list"), needle)


def test_cli_config_env_var(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    dest = tmp_path / "dest"
    dest.mkdir()
    p.write_text(f"destination:\n  url: file://{dest}\n")
    res = run_cli("list", "--json", env={"TINYSERVE_BACKUP_CONFIG": str(p)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_cli_config_and_list_against_s3(tmp_path: Path, s3_server: MotoServer, bucket: str) -> None:
    p = tmp_path / "c.yaml"
    secret = "S3CR3T-never-in-a-file-or-log"
    res = run_cli(
        "--config",
        str(p),
        "config",
        "--bucket",
        bucket,
        "--prefix",
        "tiny/{hostname}",
        "--endpoint",
        s3_server.endpoint,
        "--region",
        "us-east-1",
        "--access-key",
        "AKIDTEST",
        "--secret-key-stdin",
        "--path-style",
        "--root",
        str(tmp_path / "root"),
        input=secret + "\n",
    )
    assert res.returncode == 0, res.stderr
    from daemon.config import short_hostname

    assert f"Destination s3://{bucket}/tiny/{short_hostname()} is reachable." in res.stdout
    assert secret not in p.read_text()
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    res = run_cli("--config", str(p), "list", "--json")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    home = Path(os.environ["HOME"])
    for f in home.rglob("*"):
        if f.is_file() and "credentials" not in f.name and "keychain" not in f.name:
            assert secret.encode() not in f.read_bytes(), f


def test_cli_nonexistent_bucket(tmp_path: Path, s3_server: MotoServer) -> None:
    p = tmp_path / "c.yaml"
    res = run_cli(
        "--config",
        str(p),
        "config",
        "--bucket",
        "no-such-bucket",
        "--endpoint",
        s3_server.endpoint,
        "--path-style",
    )
    _assert_one_line_error(res, "does not exist")
    # Later commands name the bucket, where it was looked for, and the key that holds it.
    res = run_cli("--config", str(p), "list")
    _assert_one_line_error(res, f"bucket 'no-such-bucket' does not exist at {s3_server.endpoint}")
    assert "`destination.url`" in res.stderr


def test_cli_unreachable_endpoint(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    url = f"http://127.0.0.1:{free_port()}"
    res = run_cli("--config", str(p), "config", "--bucket", "b", "--endpoint", url)
    _assert_one_line_error(res, f"cannot reach the storage endpoint {url}")


def test_cli_wrong_secret(tmp_path: Path, s3_auth_server: tuple[MotoServer, str, str, str]) -> None:
    server, bucket, key_id, secret = s3_auth_server
    p = tmp_path / "c.yaml"
    argv = ["--config", str(p), "config", "--bucket", bucket, "--endpoint", server.endpoint]
    argv += ["--path-style", "--access-key", key_id, "--secret-key-stdin"]
    wrong = "WRONG" + secret[5:]
    res = run_cli(*argv, input=wrong + "\n")
    _assert_one_line_error(res, "access denied")
    assert "(the config and the key were saved all the same)" in res.stderr
    assert wrong not in res.stderr and wrong not in res.stdout
    res = run_cli(*argv, input=secret + "\n")
    assert res.returncode == 0, res.stderr


def test_cli_init_creates_config(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "c.yaml"
    res = run_cli("--config", str(p), "config", "--init")
    assert res.returncode == 0, res.stderr
    assert p.exists() and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert "# tinyserve-backup configuration" in p.read_text()


def test_the_default_local_folder_is_made_and_a_named_one_only_under_an_existing_parent(
    tmp_path: Path,
) -> None:
    """`make run` before any S3 is configured: `config --init`, then backups to our own folder."""
    from daemon.paths import default_local_destination
    from tests.helpers.rootfactory import make_root

    env = {"TINYSERVE_ROOT": str(make_root(tmp_path / "root", size="tiny", seed=3).path)}
    p = tmp_path / "c.yaml"
    assert run_cli("--config", str(p), "config", "--init").returncode == 0
    res = run_cli("--config", str(p), "create", "--partial", "--json", env=env)
    assert res.returncode == 0, res.stderr
    ts = json.loads(res.stdout)["timestamp"]
    assert (default_local_destination() / "partial" / ts / "manifest.json").is_file()
    assert stat.S_IMODE(default_local_destination().stat().st_mode) == 0o700

    # A folder the user names is made when its parent exists...
    new = tmp_path / "disk" / "backups"
    (tmp_path / "disk").mkdir()
    res = run_cli("--config", str(p), "config", "--local", str(new))
    assert res.returncode == 0, res.stderr
    assert new.is_dir() and f"Created {new}." in res.stdout
    # ...but not under a missing one (an unmounted disk), and not later by a backup.
    unmounted = tmp_path / "Volumes" / "Backup" / "tinyserve"
    res = run_cli("--config", str(p), "config", "--local", str(unmounted))
    _assert_one_line_error(res, "does not exist")
    res = run_cli("--config", str(p), "create", "--partial", env=env)
    _assert_one_line_error(res, "mount the disk")
    assert not (tmp_path / "Volumes").exists()


def test_storing_another_key_pair_warns_that_it_replaces_the_first(tmp_path: Path) -> None:
    first = ["--bucket", "one", "--access-key", "AKIAFIRST", "--secret-key-stdin", "--no-check"]
    res = run_cli("--config", str(tmp_path / "a.yaml"), "config", *first, input="s3cret-one\n")
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    res = run_cli("--config", str(tmp_path / "a.yaml"), "config", *first, input="s3cret-one\n")
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr  # the same key again
    second = ["--bucket", "two", "--access-key", "AKIASECOND", "--secret-key-stdin", "--no-check"]
    res = run_cli("--config", str(tmp_path / "b.yaml"), "config", *second, input="s3cret-two\n")
    assert res.returncode == 0, res.stderr
    assert "replacing the stored key AKIAFIRST with AKIASECOND" in res.stderr
    assert "destination.profile" in res.stderr and "s3cret" not in res.stderr + res.stdout


def test_config_show_without_a_file_prints_the_defaults(tmp_path: Path) -> None:
    res = run_cli("--config", str(tmp_path / "none.yaml"), "config", "--show")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown["destination"]["url"].startswith("file://") and shown["wal"]["enabled"] is True
    assert not (tmp_path / "none.yaml").exists()


def test_config_local_never_makes_a_disk_mount_point_and_fails_clearly(tmp_path: Path) -> None:
    from daemon.cli import _mount_point_dir

    for p in ("/Volumes/Backup", "/media/Backup", "/media/me/Backup", "/mnt/nas", "/run/media/me/B"):
        assert _mount_point_dir(Path(p)), p
    for p in ("/Volumes/Backup/tinyserve", "/home/me/backups", "/srv/backups"):
        assert not _mount_point_dir(Path(p)), p
    res = run_cli("--config", str(tmp_path / "c.yaml"), "config", "--local", "/proc/tsb-nope")
    _assert_one_line_error(res, "cannot create /proc/tsb-nope")
    assert res.returncode == 3
