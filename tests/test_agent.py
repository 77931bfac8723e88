"""The background agent: LaunchAgent plist / systemd user unit, install, upgrade, uninstall.

launchctl, systemctl and security are the stand-ins from tests/fakes (on PATH via the autouse
``isolated_user`` fixture); they record every call to $FAKE_CALLS_LOG.
"""

from __future__ import annotations

import json
import os
import plistlib
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from daemon import agent, keychain, paths
from daemon.agent import LABEL, UNIT_NAME, install_agent, uninstall_agent
from daemon.errors import AgentError

REPO = Path(__file__).resolve().parent.parent
SECRET = "kY8s/SECRET+never+in+files/0123456789ab"
ENV_SECRET = "ENVsecret/that/must/not/leak/9876543210"


def calls(prog: str | None = None) -> list[list[str]]:
    path = Path(os.environ["FAKE_CALLS_LOG"])
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [[r["prog"], *r["args"]] for r in records if prog is None or r["prog"] == prog]


def clear_calls() -> None:
    Path(os.environ["FAKE_CALLS_LOG"]).unlink(missing_ok=True)


@pytest.fixture
def program(isolated_user: Path) -> Path:
    """A stand-in for the stable venv's tinyserve-backup (answers --help)."""
    venv = paths.data_home() / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    prog = venv / "bin" / "tinyserve-backup"
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o755)
    return prog


@pytest.fixture
def config_path(isolated_user: Path) -> Path:
    return paths.default_config_path()


@pytest.fixture(autouse=True)
def _no_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(agent.ENV_KIND, raising=False)
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setattr(agent, "BOOTSTRAP_RETRY_DELAYS_S", (0.0, 0.0, 0.0))


def gui() -> str:
    return f"gui/{os.getuid()}"


# ------------------------------------------------------------------------------------------------
# launchd
# ------------------------------------------------------------------------------------------------


def test_plist_has_required_keys(isolated_user: Path, program: Path, config_path: Path) -> None:
    result = install_agent("launchd", config_path, program)
    plist_file = isolated_user / "Library" / "LaunchAgents" / "dev.tinyserve.backup.plist"
    assert result.unit_path == plist_file
    assert stat.S_IMODE(plist_file.stat().st_mode) == 0o644
    plist = plistlib.loads(plist_file.read_bytes())

    assert plist["Label"] == LABEL
    args = plist["ProgramArguments"]
    assert args == [str(program), "--config", str(config_path), "run"]
    assert Path(args[0]).is_absolute() and Path(args[2]).is_absolute()
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(plist["ThrottleInterval"], int) and plist["ThrottleInterval"] >= 10
    assert plist["ProcessType"] == "Background"
    assert plist["LowPriorityIO"] is True
    assert isinstance(plist["Nice"], int) and plist["Nice"] > 0
    assert plist["ExitTimeOut"] >= 20  # time for the SIGTERM flush
    logs = isolated_user / "Library" / "Logs" / "tinyserve-backup"
    assert Path(plist["StandardOutPath"]).parent == logs
    assert Path(plist["StandardErrorPath"]).parent == logs
    assert logs.is_dir()
    assert set(plist["EnvironmentVariables"]) == {"PATH"}
    path_dirs = plist["EnvironmentVariables"]["PATH"].split(":")
    assert path_dirs[0] == str(program.parent)
    assert all(d.startswith("/") for d in path_dirs)
    assert "/usr/bin" in path_dirs


def test_launchd_install_sequence_and_reinstall(
    isolated_user: Path, program: Path, config_path: Path
) -> None:
    plist_file = str(isolated_user / "Library" / "LaunchAgents" / "dev.tinyserve.backup.plist")
    install_agent("launchd", config_path, program)
    install_agent("launchd", config_path, program)
    seq = calls("launchctl")
    expected_once = [
        ["launchctl", "bootout", f"{gui()}/{LABEL}"],
        ["launchctl", "enable", f"{gui()}/{LABEL}"],
        ["launchctl", "bootstrap", gui(), plist_file],
    ]
    assert seq == expected_once * 2


def test_launchd_reports_first_install_vs_restart(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real launchctl exits 3 ("No such process") or 113 when the job is not loaded.
    monkeypatch.setenv("FAKE_LAUNCHCTL_EXIT_BOOTOUT", "113")
    first = install_agent("launchd", config_path, program)
    assert first.was_running is False
    monkeypatch.delenv("FAKE_LAUNCHCTL_EXIT_BOOTOUT")
    second = install_agent("launchd", config_path, program)
    assert second.was_running is True


def test_launchd_bootstrap_retries_then_fails_clearly(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAUNCHCTL_EXIT_BOOTSTRAP", "5")
    monkeypatch.setenv("FAKE_LAUNCHCTL_STDERR", "Bootstrap failed: 5: Input/output error")
    with pytest.raises(AgentError) as info:
        install_agent("launchd", config_path, program)
    assert "Input/output error" in info.value.message
    assert "make install-agent" in info.value.fix
    bootstraps = [c for c in calls("launchctl") if c[1] == "bootstrap"]
    assert len(bootstraps) == 1 + len(agent.BOOTSTRAP_RETRY_DELAYS_S)


def test_launchd_bootstrap_non_retryable_fails_at_once(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAUNCHCTL_EXIT_BOOTSTRAP", "1")
    with pytest.raises(AgentError):
        install_agent("launchd", config_path, program)
    assert len([c for c in calls("launchctl") if c[1] == "bootstrap"]) == 1


def test_validate_plist_rejects_secret_env_and_relative_paths(program: Path, config_path: Path) -> None:
    good = agent.render_plist(program, config_path, path_env="/usr/bin:/bin")
    plist = plistlib.loads(good)
    plist["EnvironmentVariables"]["AWS_SECRET_ACCESS_KEY"] = "x"
    with pytest.raises(AgentError, match="only PATH"):
        agent.validate_plist(plistlib.dumps(plist), program=program, config_path=config_path)
    with pytest.raises(AgentError, match="absolute"):
        agent.validate_plist(
            agent.render_plist(Path("bin/tsb"), Path("c.yaml"), path_env="/usr/bin"),
            program=Path("bin/tsb"),
            config_path=Path("c.yaml"),
        )


def test_plist_template_is_a_plist_with_placeholders() -> None:
    """launchd/*.plist.in is the human-readable source of truth: valid XML, documented keys."""
    raw = (REPO / "launchd" / "dev.tinyserve.backup.plist.in").read_bytes()
    template = plistlib.loads(raw)
    assert template["ProgramArguments"] == ["@PROGRAM@", "--config", "@CONFIG@", "run"]
    assert template["EnvironmentVariables"] == {"PATH": "@PATH@"}


def test_program_named_by_plist_runs(
    isolated_user: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real console script (dev venv) as the agent program: it must start and answer."""
    prog = Path(sys.executable).parent / "tinyserve-backup"
    if not prog.exists():
        pytest.skip("the dev venv has no tinyserve-backup console script")
    # The dev venv may hold an older non-editable copy of the package: run the checkout's code.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    env = dict(os.environ)
    install_agent("launchd", config_path, prog)
    plist = plistlib.loads((isolated_user / "Library/LaunchAgents/dev.tinyserve.backup.plist").read_bytes())
    argv = plist["ProgramArguments"]
    # Exactly the plist's argv, with --help instead of `run`'s work: the global options parse.
    proc = subprocess.run(
        [*argv[:-1], "--help"], env=env, capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    assert "run" in proc.stdout or "Commands" in proc.stdout


def test_broken_program_is_refused_before_anything_loads(
    isolated_user: Path, program: Path, config_path: Path
) -> None:
    program.write_text("#!/bin/sh\necho 'ModuleNotFoundError: daemon' >&2\nexit 1\n")
    with pytest.raises(AgentError, match="does not run") as info:
        install_agent("launchd", config_path, program)
    assert "ModuleNotFoundError" in info.value.message
    assert calls("launchctl") == []
    assert not (isolated_user / "Library" / "LaunchAgents").exists()


def test_missing_service_manager_writes_nothing(
    isolated_user: Path, program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    if shutil.which("launchctl"):
        pytest.skip("a real launchctl is on PATH")
    with pytest.raises(AgentError, match="launchctl") as info:
        install_agent("launchd", config_path, program)
    assert "AGENT=systemd" in info.value.fix
    assert not (isolated_user / "Library" / "LaunchAgents").exists()
    assert not config_path.exists()


# ------------------------------------------------------------------------------------------------
# systemd
# ------------------------------------------------------------------------------------------------


def unit_file(home: Path) -> Path:
    return home / ".config" / "systemd" / "user" / UNIT_NAME


def test_unit_file_is_valid(isolated_user: Path, program: Path, config_path: Path) -> None:
    result = install_agent("systemd", config_path, program)
    path = unit_file(isolated_user)
    assert result.unit_path == path
    text = path.read_text()
    parsed = agent.parse_unit(text)
    svc = parsed["Service"]
    assert svc["Type"] == ["simple"]
    assert svc["Restart"] == ["on-failure"]
    assert int(svc["RestartSec"][0]) >= 10
    assert svc["Nice"] == ["10"]
    assert svc["IOSchedulingClass"] == ["idle"]
    assert svc["TimeoutStopSec"] == ["25"]
    assert svc["KillSignal"] == ["SIGTERM"]
    assert parsed["Install"]["WantedBy"] == ["default.target"]
    assert shlex.split(svc["ExecStart"][0]) == [str(program), "--config", str(config_path), "run"]
    assert len(svc["Environment"]) == 1 and svc["Environment"][0].startswith('"PATH=/')
    assert "@" not in text.split("[Unit]", 1)[1]
    # the header still explains the placeholders instead of showing them filled in
    assert "#   @EXEC_START@   " in text and str(program) not in text.split("[Unit]", 1)[0]


def test_unit_file_passes_systemd_analyze(isolated_user: Path, program: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # A config path with everything systemd treats specially: spaces, %, $, quotes, backslash.
    odd = tmp_path / 'my cfg %h $HOME "q" back\\slash' / "config.yaml"
    install_agent("systemd", odd, program)
    path = unit_file(isolated_user)
    proc = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [ln for ln in proc.stderr.splitlines() if UNIT_NAME in ln]
    assert proc.returncode == 0 and not complaints, proc.stderr
    # Our own reading of the quoting agrees with what was meant.
    exec_start = agent.parse_unit(path.read_text())["Service"]["ExecStart"][0]
    words = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(exec_start)]
    assert words == [str(program), "--config", str(odd), "run"]


def test_systemd_sequence_first_install(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SYSTEMCTL_EXIT_IS_ACTIVE", "3")  # inactive
    result = install_agent("systemd", config_path, program)
    assert result.was_running is False
    seq = [c[1:] for c in calls("systemctl")]
    assert seq == [
        ["--user", "daemon-reload"],
        ["--user", "is-active", UNIT_NAME],
        ["--user", "enable", "--now", UNIT_NAME],
    ]


def test_systemd_reinstall_restarts(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SYSTEMCTL_EXIT_IS_ACTIVE", "3")
    install_agent("systemd", config_path, program)
    monkeypatch.delenv("FAKE_SYSTEMCTL_EXIT_IS_ACTIVE")  # now the stand-in says "active"
    clear_calls()
    result = install_agent("systemd", config_path, program)
    assert result.was_running is True
    seq = [c[1:] for c in calls("systemctl")]
    assert seq.index(["--user", "daemon-reload"]) < seq.index(["--user", "enable", "--now", UNIT_NAME])
    assert seq[-1] == ["--user", "restart", UNIT_NAME]


def test_systemd_not_running_explains(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SYSTEMCTL_EXIT", "1")
    monkeypatch.setenv(
        "FAKE_SYSTEMCTL_STDERR",
        "System has not been booted with systemd as init system (PID 1). Can't operate.",
    )
    with pytest.raises(AgentError) as info:
        install_agent("systemd", config_path, program)
    assert "tinyserve-backup run" in info.value.fix


def test_systemd_without_user_bus_explains(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SYSTEMCTL_EXIT_DAEMON_RELOAD", "1")
    monkeypatch.setenv("FAKE_SYSTEMCTL_STDERR", "Failed to connect to bus: No medium found")
    with pytest.raises(AgentError) as info:
        install_agent("systemd", config_path, program)
    assert "Failed to connect to bus" in info.value.message
    assert "enable-linger" in info.value.fix
    # nothing left behind that `agent status` would call installed
    assert not agent.agent_file("systemd").exists()
    assert agent.agent_status("systemd").installed is False


def test_a_failed_upgrade_puts_the_previous_agent_file_back(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_agent("launchd", config_path, program)
    before = agent.agent_file("launchd").read_bytes()
    other = program.parents[2] / "elsewhere" / "tinyserve-backup"  # outside the stable venv
    other.parent.mkdir()
    other.write_bytes(program.read_bytes())
    other.chmod(0o755)
    monkeypatch.setenv("FAKE_LAUNCHCTL_EXIT_BOOTSTRAP", "1")
    with pytest.raises(AgentError) as info:
        install_agent("launchd", config_path, other)
    assert agent.agent_file("launchd").read_bytes() == before
    assert "not the stable install" in info.value.message  # the warning is not lost with the error


def test_default_kind_on_linux_is_systemd(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert install_agent(None, config_path, program).kind == "systemd"
    monkeypatch.setenv(agent.ENV_KIND, "launchd")
    assert install_agent(None, config_path, program).kind == "launchd"
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv(agent.ENV_KIND)
    assert agent.resolve_kind(None) == "launchd"
    with pytest.raises(AgentError, match="upstart"):
        agent.resolve_kind("upstart")


# ------------------------------------------------------------------------------------------------
# config, secrets, uninstall
# ------------------------------------------------------------------------------------------------


def test_config_created_from_example_0600_and_then_kept(program: Path, config_path: Path) -> None:
    old = os.umask(0)
    try:
        result = install_agent("systemd", config_path, program)
    finally:
        os.umask(old)
    assert result.config_created is True
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert config_path.read_text() == (REPO / "config" / "tinyserve-backup.yaml").read_text()
    config_path.write_text("# edited by hand\n")
    again = install_agent("systemd", config_path, program)
    assert again.config_created is False
    assert config_path.read_text() == "# edited by hand\n"


@pytest.mark.parametrize("kind", ["launchd", "systemd"])
def test_no_secret_in_any_written_file(
    isolated_user: Path,
    tmp_path: Path,
    program: Path,
    config_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    keychain.store_secret("AKIAAGENTTEST0000000", SECRET, backend="keychain")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)  # in the installing shell's env
    install_agent(kind, config_path, program)
    install_agent(kind, config_path, program)
    keychain_state = Path(os.environ["FAKE_SECURITY_STATE"]).resolve()
    checked = 0
    for path in tmp_path.rglob("*"):
        if not path.is_file() or path.resolve().is_relative_to(keychain_state):
            continue
        data = path.read_bytes()
        assert SECRET.encode() not in data, path
        assert ENV_SECRET.encode() not in data, path
        checked += 1
    assert checked >= 3  # config, unit/plist, calls log at least
    for call in calls():
        assert SECRET not in json.dumps(call) and ENV_SECRET not in json.dumps(call)


@pytest.mark.parametrize("kind", ["launchd", "systemd"])
def test_uninstall_keeps_config_credentials_logs(
    isolated_user: Path, program: Path, config_path: Path, kind: str
) -> None:
    install_agent(kind, config_path, program)
    keychain.store_secret("AKIAAGENTTEST0000000", SECRET, backend="file")
    cred_file = keychain.credentials_path()
    log_file = paths.default_log_file()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text('{"event": "x"}\n')
    crash = agent.crash_log_path()
    if kind == "launchd":
        crash.write_text("crash\n")
    unit = agent.agent_file(kind)  # type: ignore[arg-type]
    venv = program.parent.parent
    clear_calls()

    result = uninstall_agent()

    assert result.kinds == (kind,)
    assert not unit.exists()
    assert not venv.exists()
    assert set(result.removed) == {unit, venv}
    assert config_path.exists() and cred_file.exists() and log_file.exists()
    assert keychain.load_credentials(backend="file") == ("AKIAAGENTTEST0000000", SECRET)
    if kind == "launchd":
        assert crash.exists()
        assert calls("launchctl") == [["launchctl", "bootout", f"{gui()}/{LABEL}"]]
    else:
        seq = [c[1:] for c in calls("systemctl")]
        assert ["--user", "disable", "--now", UNIT_NAME] in seq
        assert seq[-1] == ["--user", "daemon-reload"]
    kept = dict(result.kept)
    assert str(config_path) in kept["config"]
    assert "credentials" in kept


def test_uninstall_leaves_a_non_venv_alone(isolated_user: Path, program: Path, config_path: Path) -> None:
    install_agent("systemd", config_path, program)
    (program.parent.parent / "pyvenv.cfg").unlink()
    result = uninstall_agent()
    assert program.exists()
    assert any("does not look like a venv" in w for w in result.warnings)


def test_uninstall_when_nothing_installed(isolated_user: Path) -> None:
    result = uninstall_agent()
    assert result.removed == ()
    assert result.kinds == ("systemd",)


def test_refuses_sudo(program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "someone")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(AgentError, match="sudo"):
        install_agent("systemd", config_path, program)


def test_status(isolated_user: Path, program: Path, config_path: Path, tmp_path: Path) -> None:
    assert agent.agent_status("launchd").installed is False
    install_agent("launchd", config_path, program)
    st = agent.agent_status()
    assert st.kind == "launchd" and st.installed and st.program == program
    install_agent("systemd", tmp_path / "with %percent" / "c.yaml", program)
    st = agent.agent_status("systemd")
    assert st.installed and st.program == program and st.running is True


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


class _Obj:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path


def _root_with_agent(config_path: Path) -> click.Group:
    """Stands in for the lead's `cli` group: it sets ctx.obj.config_path from --config."""

    @click.group()
    @click.pass_context
    def root(ctx: click.Context) -> None:
        ctx.obj = _Obj(config_path)

    root.add_command(agent.agent_cli, "agent")
    return root


def test_cli_install_status_uninstall(isolated_user: Path, program: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "custom" / "cfg.yaml"
    runner = CliRunner()
    root = _root_with_agent(cfg)
    res = runner.invoke(root, ["agent", "install", "--kind", "systemd", "--program", str(program)])
    assert res.exit_code == 0, res.output
    assert f"Config created: {cfg}" in res.output
    assert str(unit_file(isolated_user)) in res.output
    exec_start = agent.parse_unit(unit_file(isolated_user).read_text())["Service"]["ExecStart"][0]
    assert shlex.split(exec_start)[2] == str(cfg)

    res = runner.invoke(root, ["agent", "status"])
    assert res.exit_code == 0 and "installed" in res.output and "running" in res.output

    res = runner.invoke(root, ["agent", "uninstall"])
    assert res.exit_code == 0, res.output
    assert f"Kept config: {cfg}" in res.output
    assert "Kept credentials" in res.output and "Kept logs" in res.output
    assert cfg.exists()


def test_real_cli_has_agent_group() -> None:
    from daemon import cli

    assert cli.cli.commands["agent"] is agent.agent_cli


def test_make_agent_home_matches_python(isolated_user: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    for env_home in (str(isolated_user / "tsb"), None):
        env = dict(os.environ)
        if env_home is None:
            env.pop("TINYSERVE_BACKUP_HOME", None)
            monkeypatch.delenv("TINYSERVE_BACKUP_HOME")
        out = subprocess.run(
            [make, "-s", "-f", str(REPO / "mk" / "agent.mk"), "agent-home"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        assert out == str(paths.data_home())


# ------------------------------------------------------------------------------------------------
# The whole thing: `make install-agent` into a stable venv from a throwaway checkout
# ------------------------------------------------------------------------------------------------


def _copy_checkout(dest: Path) -> None:
    """Tracked and new (not ignored) files of the checkout: what a user's clone would hold."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = raw.decode()
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_install_agent_end_to_end(
    isolated_user: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, git = shutil.which("make"), shutil.which("git")
    if make is None or git is None:
        pytest.skip("make and git are needed")
    checkout = tmp_path / "clone"
    checkout.mkdir()
    _copy_checkout(checkout)
    # Like macOS's "Application Support": console-script shebangs must survive the space.
    home = tmp_path / "Application Support" / "tinyserve-backup"
    monkeypatch.setenv("TINYSERVE_BACKUP_HOME", str(home))
    venv = home / "venv"
    monkeypatch.setenv("FAKE_SYSTEMCTL_EXIT_IS_ACTIVE", "3")
    env = dict(os.environ, PYTHON=sys.executable, AGENT="systemd")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)

    def make_target(target: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                make,
                "-s",
                "-f",
                str(checkout / "mk" / "agent.mk"),
                target,
                *[f"{k}={v}" for k, v in extra.items()],
            ],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )

    t0 = time.monotonic()
    first = make_target("install-agent", AGENT="systemd")
    assert first.returncode == 0, first.stdout + first.stderr
    unit = unit_file(isolated_user)
    exec_start = agent.parse_unit(unit.read_text())["Service"]["ExecStart"][0]
    argv = shlex.split(exec_start)
    assert argv[0] == str(venv / "bin" / "tinyserve-backup")
    assert argv[1:] == ["--config", str(paths.default_config_path()), "run"]
    assert stat.S_IMODE(paths.default_config_path().stat().st_mode) == 0o600
    seq = [c[1:] for c in calls("systemctl")]
    assert seq.index(["--user", "daemon-reload"]) < seq.index(["--user", "enable", "--now", UNIT_NAME])

    # Upgrade in place: tamper with the installed copy, install again, the checkout's code is back.
    installed = next(venv.glob("lib/python*/site-packages/daemon/agent.py"))
    installed.write_text(installed.read_text() + "\n# tampered\n")
    monkeypatch.delenv("FAKE_SYSTEMCTL_EXIT_IS_ACTIVE")
    env.pop("FAKE_SYSTEMCTL_EXIT_IS_ACTIVE")
    clear_calls()
    second = make_target("install-agent", AGENT="systemd")
    assert second.returncode == 0, second.stdout + second.stderr
    assert installed.read_text() == (REPO / "daemon" / "agent.py").read_text()
    assert [c[1:] for c in calls("systemctl")][-1] == ["--user", "restart", UNIT_NAME]

    # Deleting the checkout breaks nothing: the unit's program still runs.
    shutil.rmtree(checkout)
    proc = subprocess.run(
        [*argv[:-1], "--help"], env=env, capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr

    # Uninstall through the stable venv (the checkout is gone, so run the installed program).
    proc = subprocess.run(
        [str(venv / "bin" / "tinyserve-backup"), "agent", "uninstall"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert not unit.exists() and not venv.exists()
    assert paths.default_config_path().exists()
    assert "Kept config" in proc.stdout
    print(f"make install-agent end to end: {time.monotonic() - t0:.1f} s")


def test_a_root_set_only_in_the_environment_is_warned_about(
    program: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """launchd and systemd start the agent with PATH alone: TINYSERVE_ROOT does not reach it."""
    monkeypatch.setenv("TINYSERVE_ROOT", str(tmp_path / "my-root"))
    result = install_agent("launchd", config_path, program)
    assert any("does not inherit it" in w and "--root" in w for w in result.warnings)
    config_path.write_text(config_path.read_text() + f"root: {tmp_path / 'my-root'}\n")
    result = install_agent("launchd", config_path, program)
    assert not any("does not inherit" in w for w in result.warnings)
