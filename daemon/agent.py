"""Install the daemon as a per-user background agent: a macOS LaunchAgent or a systemd user unit.

``make install-agent`` puts the program in a venv of its own (``paths.data_home()/venv``) and then
runs ``<that venv>/bin/tinyserve-backup agent install``, which lands here:

1. check the program the agent will run actually runs (``--help``), so a broken install is caught
   now rather than as a crash loop;
2. create the config from the packaged example if there is none (0600) and say where it is;
3. render ``launchd/dev.tinyserve.backup.plist.in`` (plistlib) or
   ``launchd/tinyserve-backup.service.in`` with absolute paths and nothing secret, validate it,
   write it atomically;
4. (re)load it: ``launchctl bootout`` + ``bootstrap gui/$UID`` — or ``systemctl --user
   daemon-reload`` + ``enable --now`` (+ ``restart`` when it was already running, so an upgrade
   takes effect).

Running it again upgrades in place.  ``agent uninstall`` stops and removes the agent and the venv,
and keeps config, credentials and logs.  These are one-shot CLI operations, not part of the daemon's
event loop, so plain ``subprocess.run`` (bounded by timeouts) is fine here.
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import click
import structlog
import yaml

from daemon import keychain, paths
from daemon.errors import AgentError, BackupError
from daemon.fsutil import write_atomic

log = structlog.get_logger(__name__)

LABEL: Final = "dev.tinyserve.backup"
UNIT_NAME: Final = "tinyserve-backup.service"
PLIST_TEMPLATE: Final = "dev.tinyserve.backup.plist.in"
UNIT_TEMPLATE: Final = "tinyserve-backup.service.in"
CONFIG_EXAMPLE: Final = "tinyserve-backup.yaml"
ENV_KIND: Final = "TINYSERVE_BACKUP_AGENT"
TOOL_TIMEOUT_S: Final = 60.0
# launchd sometimes refuses a bootstrap right after a bootout ("5: Input/output error") while the
# old job is still being torn down; a short retry is the known remedy.
BOOTSTRAP_RETRY_DELAYS_S: tuple[float, ...] = (1.0, 2.0, 4.0)
_BOOTSTRAP_RETRYABLE: Final = frozenset({5, 37})
_BOOTOUT_NOT_LOADED: Final = frozenset({3, 113})

Kind = Literal["launchd", "systemd"]
KINDS: Final = ("launchd", "systemd")


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallResult:
    kind: Kind
    unit_path: Path
    config_path: Path
    config_created: bool
    program: Path
    was_running: bool
    crash_log: Path | None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class UninstallResult:
    kinds: tuple[Kind, ...]
    removed: tuple[Path, ...]
    kept: tuple[tuple[str, str], ...]
    was_running: bool
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentStatus:
    kind: Kind
    unit_path: Path
    installed: bool
    running: bool | None  # None: could not ask launchd/systemd
    program: Path | None
    detail: str = ""


# ---------------------------------------------------------------------------------------------
# Places
# ---------------------------------------------------------------------------------------------


def venv_dir() -> Path:
    """The agent's own venv, outside any checkout (``$TINYSERVE_BACKUP_HOME/venv`` in tests)."""
    return paths.data_home().expanduser().absolute() / "venv"


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def unit_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser().absolute() / "systemd" / "user" / UNIT_NAME


def launchd_log_dir() -> Path:
    return Path.home() / "Library" / "Logs" / paths.APP


def crash_log_path() -> Path:
    return launchd_log_dir() / "crash.log"


def agent_file(kind: Kind) -> Path:
    return plist_path() if kind == "launchd" else unit_path()


def default_program() -> Path:
    """The ``tinyserve-backup`` next to the running interpreter (the venv we run from)."""
    candidate = Path(sys.executable).parent / "tinyserve-backup"
    if candidate.exists():
        return candidate.absolute()
    found = shutil.which("tinyserve-backup")
    if found:
        return Path(found).absolute()
    raise AgentError(
        "cannot find the tinyserve-backup program to run as the agent",
        fix="run `make install-agent` from the checkout",
    )


def resolve_kind(kind: str | None = None) -> Kind:
    """Explicit choice, then ``$TINYSERVE_BACKUP_AGENT``, then launchd on macOS, systemd elsewhere."""
    choice = (kind or os.environ.get(ENV_KIND) or "").strip().lower()
    if not choice:
        return "launchd" if sys.platform == "darwin" else "systemd"
    if choice == "launchd":
        return "launchd"
    if choice == "systemd":
        return "systemd"
    raise AgentError(f"unknown agent kind {choice!r}", fix="use AGENT=launchd or AGENT=systemd")


# ---------------------------------------------------------------------------------------------
# Templates and rendering
# ---------------------------------------------------------------------------------------------


def _packaged_text(kind: str, name: str) -> str:
    """A data file shipped with the program (``paths.resource``: wheel, else source checkout)."""
    try:
        return paths.resource(kind, name).read_text(encoding="utf-8")
    except OSError:
        raise AgentError(
            f"the packaged file {name} is missing from this installation",
            fix="reinstall with `make install-agent` from a complete checkout",
        ) from None


def template_text(name: str) -> str:
    return _packaged_text("launchd", name)


def agent_path_env(program: Path) -> str:
    """PATH for the agent: its own bin, where docker/tinyserve live for this user, the basics.

    launchd starts agents with only /usr/bin:/bin:/usr/sbin:/sbin, where Docker Desktop's and
    Homebrew's tools are not; we name the directories the installing user's shell finds them in.
    """
    dirs: list[str] = [str(program.parent)]
    for tool in ("docker", "tinyserve", "tinyserved"):
        found = shutil.which(tool)
        if found:
            dirs.append(str(Path(found).parent))
    if sys.platform == "darwin":
        dirs += ["/opt/homebrew/bin", "/usr/local/bin"]
    else:
        dirs += ["/usr/local/bin"]
    dirs += ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
    clean = [d for d in dirs if d.startswith("/") and ":" not in d and "\n" not in d]
    return ":".join(dict.fromkeys(clean))


def _substitute(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, str):
        for placeholder, replacement in mapping.items():
            value = value.replace(placeholder, replacement)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, mapping) for v in value]
    return value


_PLACEHOLDER = re.compile(r"@[A-Z_]+@")


def _find_placeholders(value: Any) -> list[str]:
    if isinstance(value, str):
        return _PLACEHOLDER.findall(value)
    if isinstance(value, dict):
        return [p for v in value.values() for p in _find_placeholders(v)]
    if isinstance(value, list):
        return [p for v in value for p in _find_placeholders(v)]
    return []


def render_plist(program: Path, config_path: Path, *, path_env: str | None = None) -> bytes:
    """The LaunchAgent plist: the template parsed by plistlib, placeholders filled, re-serialised."""
    try:
        template = plistlib.loads(template_text(PLIST_TEMPLATE).encode("utf-8"))
    except plistlib.InvalidFileException as exc:
        raise AgentError(
            f"the plist template {PLIST_TEMPLATE} is not a valid plist: {exc}",
            fix="restore launchd/dev.tinyserve.backup.plist.in from git",
        ) from None
    mapping = {
        "@PROGRAM@": str(program),
        "@CONFIG@": str(config_path),
        "@LOG_DIR@": str(launchd_log_dir()),
        "@PATH@": path_env if path_env is not None else agent_path_env(program),
    }
    rendered = _substitute(template, mapping)
    data = plistlib.dumps(rendered, fmt=plistlib.FMT_XML, sort_keys=False)
    validate_plist(data, program=program, config_path=config_path)
    return data


def validate_plist(data: bytes, *, program: Path, config_path: Path) -> dict[str, Any]:
    """Parse the rendered plist back and check what launchd and our invariants need."""
    try:
        plist = plistlib.loads(data)
    except plistlib.InvalidFileException as exc:
        raise AgentError(f"the rendered plist does not parse: {exc}") from None
    problems: list[str] = []
    if plist.get("Label") != LABEL:
        problems.append(f"Label is not {LABEL}")
    args = plist.get("ProgramArguments")
    expected = [str(program), "--config", str(config_path), "run"]
    if args != expected:
        problems.append(f"ProgramArguments is {args!r}, expected {expected!r}")
    elif not (Path(args[0]).is_absolute() and Path(args[2]).is_absolute()):
        problems.append("ProgramArguments must use absolute paths")
    env = plist.get("EnvironmentVariables", {})
    if set(env) - {"PATH"}:
        problems.append(f"EnvironmentVariables may hold only PATH, not {sorted(set(env) - {'PATH'})}")
    left = _find_placeholders(plist)
    if left:
        problems.append(f"unfilled placeholders {sorted(set(left))}")
    if problems:
        raise AgentError(
            "the rendered LaunchAgent plist is invalid: " + "; ".join(problems),
            fix="restore launchd/dev.tinyserve.backup.plist.in from git",
        )
    return plist


def systemd_quote(arg: str) -> str:
    """One ExecStart= word: quoted, escaped, with specifiers (%) and variables ($) made literal."""
    _no_line_breaks(arg)
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _systemd_env_assignment(name: str, value: str) -> str:
    _no_line_breaks(value)
    # Environment= expands specifiers but not $VARIABLES, so only % is doubled.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{name}={escaped}"'


def _no_line_breaks(value: str) -> None:
    if any(ch in value for ch in "\r\n\0"):
        raise AgentError(
            f"the path {value!r} contains a line break or NUL and cannot go into a unit file",
            fix="use a config path and install location without such characters",
        )


def render_unit(program: Path, config_path: Path, *, path_env: str | None = None) -> str:
    text = template_text(UNIT_TEMPLATE)
    exec_start = " ".join(systemd_quote(a) for a in (str(program), "--config", str(config_path), "run"))
    env_path = _systemd_env_assignment("PATH", path_env if path_env is not None else agent_path_env(program))
    # Placeholders are filled in settings only: the template's comments name them too.
    rendered = "".join(
        line
        if line.lstrip().startswith(("#", ";"))
        else line.replace("@EXEC_START@", exec_start).replace("@ENV_PATH@", env_path)
        for line in text.splitlines(keepends=True)
    )
    validate_unit(rendered)
    return rendered


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A small reader for unit files: {section: {key: [values…]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise AgentError(f"unit file line is not `Key=value` inside a section: {line!r}")
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def validate_unit(text: str) -> dict[str, dict[str, list[str]]]:
    parsed = parse_unit(text)
    service = parsed.get("Service", {})
    problems: list[str] = []
    for key in ("Type", "ExecStart", "Restart"):
        if key not in service:
            problems.append(f"[Service] lacks {key}=")
    if "Install" not in parsed or "WantedBy" not in parsed["Install"]:
        problems.append("[Install] lacks WantedBy=")
    for values in service.get("Environment", []):
        if not values.strip('"').startswith("PATH="):
            problems.append("Environment= may set only PATH")
    if _PLACEHOLDER.search(text.split("[Unit]", 1)[-1]):
        problems.append("unfilled placeholders")
    if problems:
        raise AgentError(
            "the rendered systemd unit is invalid: " + "; ".join(problems),
            fix="restore launchd/tinyserve-backup.service.in from git",
        )
    return parsed


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def ensure_config(config_path: Path) -> bool:
    """Create the config from the packaged example (0600) unless one exists; True if created."""
    if config_path.exists():
        return False
    example = _packaged_text("config", CONFIG_EXAMPLE)
    try:
        config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: never clobber a config another process created meanwhile.
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise AgentError(
            f"cannot create the config file {config_path}: {exc.strerror}",
            fix=f"check the permissions of {config_path.parent}, or pass --config",
        ) from exc
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, example.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("config_created", path=str(config_path))
    return True


# ---------------------------------------------------------------------------------------------
# Talking to launchd / systemd
# ---------------------------------------------------------------------------------------------


def _tool(name: str, fix: str) -> str:
    found = shutil.which(name)
    if not found:
        raise AgentError(f"`{name}` is not on PATH", fix=fix)
    return found


def _run(argv: list[str], *, timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    log.debug("agent_tool_run", argv=argv)
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise AgentError(
            f"`{' '.join(argv)}` did not finish within {timeout:.0f} s",
            fix="try again; if it hangs again, check the service manager's state by hand",
        ) from None
    except OSError as exc:
        raise AgentError(f"cannot run `{argv[0]}`: {exc.strerror}") from exc
    log.debug("agent_tool_done", argv=argv, rc=proc.returncode)
    return proc


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def _gui_domain() -> str:
    return f"gui/{os.getuid()}"


def _launchctl() -> str:
    return _tool("launchctl", "on Linux use the systemd user unit: AGENT=systemd")


def _systemctl() -> str:
    return _tool(
        "systemctl",
        "this machine has no systemd; run `tinyserve-backup run` under another supervisor",
    )


def _launchd_bootout(launchctl: str) -> bool:
    """Unload the agent if loaded; True if it was.  launchd sends SIGTERM and waits ExitTimeOut."""
    proc = _run([launchctl, "bootout", f"{_gui_domain()}/{LABEL}"])
    if proc.returncode == 0:
        return True
    if proc.returncode not in _BOOTOUT_NOT_LOADED:
        # Not fatal: the bootstrap that follows says what is really wrong if anything is.
        log.warning("launchd_bootout_failed", rc=proc.returncode, stderr=_last_line(proc.stderr))
    return False


def _launchd_bootstrap(launchctl: str, plist: Path) -> None:
    delays = (0.0, *BOOTSTRAP_RETRY_DELAYS_S)
    proc: subprocess.CompletedProcess[str] | None = None
    for attempt, delay in enumerate(delays):
        if delay:
            time.sleep(delay)
        proc = _run([launchctl, "bootstrap", _gui_domain(), str(plist)])
        if proc.returncode == 0:
            return
        if proc.returncode not in _BOOTSTRAP_RETRYABLE:
            break
        log.info("launchd_bootstrap_retry", attempt=attempt + 1, rc=proc.returncode)
    assert proc is not None
    raise AgentError(
        f"`launchctl bootstrap {_gui_domain()} {plist}` failed (exit {proc.returncode}): "
        f"{_last_line(proc.stderr or proc.stdout)}",
        fix="run `make install-agent` again; if it persists, check `launchctl print "
        f"{_gui_domain()}/{LABEL}` and the plist with `plutil -lint {plist}`",
    )


def _systemctl_user(systemctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run([systemctl, "--user", *args])


def _systemd_check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode == 0:
        return
    message = _last_line(proc.stderr or proc.stdout)
    fix = "check `systemctl --user status tinyserve-backup` and `journalctl --user -u tinyserve-backup`"
    if "booted with systemd" in message or "systemd as init" in message:
        fix = (
            f"this machine does not run systemd; the unit is at {unit_path()} but nothing can load "
            "it — run `tinyserve-backup run` under your own supervisor instead"
        )
    elif "bus" in message.lower() or "XDG_RUNTIME_DIR" in message:
        fix = (
            "run this in a systemd login session of your own user (not via sudo/su), or enable "
            "lingering with `loginctl enable-linger $USER`"
        )
    raise AgentError(f"`systemctl --user {what}` failed (exit {proc.returncode}): {message}", fix=fix)


# ---------------------------------------------------------------------------------------------
# install / uninstall / status
# ---------------------------------------------------------------------------------------------


def _refuse_sudo() -> None:
    if os.environ.get("SUDO_USER") and os.geteuid() == 0:
        raise AgentError(
            "the agent is per-user and must not be installed through sudo",
            fix="run `make install-agent` as yourself, without sudo",
        )


def _check_program(program: Path) -> None:
    if not program.is_absolute():
        raise AgentError(f"the agent program path {program} is not absolute")
    if not (program.is_file() and os.access(program, os.X_OK)):
        raise AgentError(
            f"the agent program {program} does not exist or is not executable",
            fix="run `make install-agent` from the checkout",
        )
    proc = _run([str(program), "--help"])
    if proc.returncode != 0:
        raise AgentError(
            f"the agent program {program} does not run (`--help` exit {proc.returncode}): "
            f"{_last_line(proc.stderr or proc.stdout)}",
            fix="run `make install-agent` again to rebuild its venv",
        )


def install_agent(kind: str | None, config_path: Path, program: Path) -> InstallResult:
    """Install or upgrade the agent and (re)start it.  Idempotent."""
    _refuse_sudo()
    chosen = resolve_kind(kind)
    config_path = config_path.expanduser().absolute()
    program = program.expanduser().absolute()
    warnings: list[str] = []
    # Find the service manager before writing anything, so a wrong AGENT leaves no debris.
    tool = _launchctl() if chosen == "launchd" else _systemctl()
    _check_program(program)
    stable = venv_dir()
    if not program.is_relative_to(stable):
        warnings.append(
            f"the agent will run {program}, which is not the stable install in {stable}; "
            "deleting or changing it stops the agent (use `make install-agent`)"
        )
    created = ensure_config(config_path)
    warnings += _env_root_warning(config_path)
    target = agent_file(chosen)
    previous = target.read_bytes() if target.exists() else None
    try:
        was_running, crash_log = _install_and_start(chosen, tool, target, program, config_path)
    except AgentError as exc:
        # Leave the agent file as it was: a unit left behind by a failed install made
        # `agent status` say "installed" for an agent that never ran.
        with contextlib.suppress(OSError):
            if previous is None:
                target.unlink(missing_ok=True)
            else:
                write_atomic(target, previous, mode=0o644)
        if chosen == "systemd":
            with contextlib.suppress(OSError, AgentError):
                _systemctl_user(tool, "daemon-reload")  # so systemd sees the file as it is again
        notes = [*warnings]
        if previous is not None:
            notes.append("the previous agent file is back in place but the agent may be stopped")
        if notes:
            raise AgentError(f"{exc.message} (also: {'; '.join(notes)})", exc.fix) from None
        raise
    log.info(
        "agent_installed",
        kind=chosen,
        unit=str(target),
        program=str(program),
        config=str(config_path),
        restarted=was_running,
    )
    return InstallResult(
        kind=chosen,
        unit_path=target,
        config_path=config_path,
        config_created=created,
        program=program,
        was_running=was_running,
        crash_log=crash_log,
        warnings=tuple(warnings),
    )


def _env_root_warning(config_path: Path) -> list[str]:
    """TINYSERVE_ROOT set here is not seen by the agent (launchd and systemd start it with PATH
    only): the root must be in the config, or the daemon watches the default one."""
    from .config import ENV_ROOT, expand

    env_root = os.environ.get(ENV_ROOT)
    if not env_root:
        return []
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    in_file = raw.get("root") if isinstance(raw, dict) else None
    if in_file and Path(expand(str(in_file))) == Path(expand(env_root)):
        return []
    return [
        f"{ENV_ROOT}={env_root} is set here, but the agent does not inherit it and will protect "
        f"{'the root in the config' if in_file else 'the default root'}; put it in the config: "
        f"`tinyserve-backup config --root {env_root}`"
    ]


def _install_and_start(
    chosen: str, tool: str, target: Path, program: Path, config_path: Path
) -> tuple[bool, Path | None]:
    """Write the agent file and have the service manager (re)start it: (was it running, crash log)."""
    crash_log: Path | None = None
    if chosen == "launchd":
        data = render_plist(program, config_path)
        launchd_log_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        crash_log = crash_log_path()
        # 0644: launchd ignores agents whose plist is writable by group or others.
        write_atomic(target, data, mode=0o644)
        was_running = _launchd_bootout(tool)
        # A job someone once `launchctl disable`d refuses to bootstrap; clear that override.
        _run([tool, "enable", f"{_gui_domain()}/{LABEL}"])
        _launchd_bootstrap(tool, target)
    else:
        text = render_unit(program, config_path)
        write_atomic(target, text, mode=0o644)
        _systemd_check(_systemctl_user(tool, "daemon-reload"), "daemon-reload")
        active = _systemctl_user(tool, "is-active", UNIT_NAME)
        was_running = active.returncode == 0 and active.stdout.strip() == "active"
        _systemd_check(_systemctl_user(tool, "enable", "--now", UNIT_NAME), f"enable --now {UNIT_NAME}")
        if was_running:
            # enable --now leaves a running unit alone; restart so the upgrade takes effect.
            _systemd_check(_systemctl_user(tool, "restart", UNIT_NAME), f"restart {UNIT_NAME}")
    return was_running, crash_log


def _installed_kinds() -> list[Kind]:
    return [k for k in KINDS if agent_file(k).exists()]


def uninstall_agent(
    kind: str | None = None,
    *,
    config_path: Path | None = None,
    remove_venv: bool = True,
) -> UninstallResult:
    """Stop and remove the agent (and its venv); keep config, credentials and logs."""
    _refuse_sudo()
    kinds: list[Kind] = [resolve_kind(kind)] if kind or os.environ.get(ENV_KIND) else _installed_kinds()
    if not kinds:
        kinds = [resolve_kind(None)]
    removed: list[Path] = []
    warnings: list[str] = []
    was_running = False
    for k in kinds:
        target = agent_file(k)
        if k == "launchd":
            launchctl = shutil.which("launchctl")
            if launchctl:
                was_running = _launchd_bootout(launchctl) or was_running
            elif target.exists():
                warnings.append("`launchctl` is not on PATH; removed the plist without unloading it")
        else:
            systemctl = shutil.which("systemctl")
            if systemctl and target.exists():
                active = _systemctl_user(systemctl, "is-active", UNIT_NAME)
                was_running = was_running or active.stdout.strip() == "active"
                proc = _systemctl_user(systemctl, "disable", "--now", UNIT_NAME)
                if proc.returncode != 0:
                    warnings.append(
                        f"`systemctl --user disable --now {UNIT_NAME}` failed: "
                        f"{_last_line(proc.stderr or proc.stdout)}"
                    )
            elif target.exists():
                warnings.append("`systemctl` is not on PATH; removed the unit without stopping it")
        if target.exists():
            target.unlink()
            removed.append(target)
            if k == "systemd" and (systemctl := shutil.which("systemctl")):
                _systemctl_user(systemctl, "daemon-reload")
    venv = venv_dir()
    if remove_venv and venv.is_dir():
        # Only ever delete something that is recognisably a venv, whatever the env var says.
        if (venv / "pyvenv.cfg").is_file():
            shutil.rmtree(venv)
            removed.append(venv)
        else:
            warnings.append(f"{venv} does not look like a venv (no pyvenv.cfg); left it alone")
    kept: list[tuple[str, str]] = []
    cfg = (config_path or _default_config_path()).expanduser().absolute()
    kept.append(("config", str(cfg) + ("" if cfg.exists() else " (not present)")))
    try:
        kept.append(("credentials", keychain.describe(keychain.select_backend()) + " (if stored)"))
    except BackupError:
        kept.append(("credentials", "wherever `tinyserve-backup config` stored them"))
    log_dirs = {paths.default_log_file().parent}
    if "launchd" in kinds:
        log_dirs.add(launchd_log_dir())
    for d in sorted(log_dirs):
        kept.append(("logs", str(d)))
    log.info("agent_uninstalled", kinds=list(kinds), removed=[str(p) for p in removed])
    return UninstallResult(
        kinds=tuple(kinds),
        removed=tuple(removed),
        kept=tuple(kept),
        was_running=was_running,
        warnings=tuple(warnings),
    )


def _run_quietly(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return _run(argv, timeout=15)
    except AgentError:
        return None


def agent_status(kind: str | None = None) -> AgentStatus:
    """Installed? loaded/running? which program?  Never raises for a missing service manager."""
    installed = _installed_kinds()
    chosen: Kind = resolve_kind(kind) if kind or not installed else installed[0]
    target = agent_file(chosen)
    program: Path | None = None
    running: bool | None = None
    detail = ""
    if chosen == "launchd":
        if target.exists():
            with contextlib.suppress(Exception):
                args = plistlib.loads(target.read_bytes()).get("ProgramArguments") or []
                program = Path(args[0]) if args else None
        launchctl = shutil.which("launchctl")
        proc = _run_quietly([launchctl, "print", f"{_gui_domain()}/{LABEL}"]) if launchctl else None
        if proc is not None:
            if proc.returncode == 0:
                m = re.search(r"^\s*state = (\S+)", proc.stdout, re.M)
                detail = f"loaded, state {m.group(1)}" if m else "loaded"
                running = (m.group(1) == "running") if m else None
            else:
                running, detail = False, "not loaded"
    else:
        if target.exists():
            with contextlib.suppress(Exception):
                exec_start = parse_unit(target.read_text())["Service"]["ExecStart"][0]
                first = re.match(r'"((?:[^"\\]|\\.)*)"', exec_start)
                if first:
                    word = re.sub(r"\\(.)", r"\1", first.group(1))
                    program = Path(word.replace("%%", "%").replace("$$", "$"))
        systemctl = shutil.which("systemctl")
        proc = _run_quietly([systemctl, "--user", "is-active", UNIT_NAME]) if systemctl else None
        if proc is not None:
            detail = proc.stdout.strip() or _last_line(proc.stderr)
            running = proc.stdout.strip() == "active"
    return AgentStatus(
        kind=chosen,
        unit_path=target,
        installed=target.exists(),
        running=running,
        program=program,
        detail=detail,
    )


# ---------------------------------------------------------------------------------------------
# CLI: `tinyserve-backup agent install|uninstall|status`
# ---------------------------------------------------------------------------------------------


def _default_config_path() -> Path:
    from daemon.config import resolve_config_path

    return resolve_config_path(None)


def _config_path_from_ctx() -> Path:
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    configured = getattr(obj, "config_path", None)
    if isinstance(configured, Path | str) and str(configured):
        return Path(configured)
    return _default_config_path()


_KIND_OPTION = click.option(
    "--kind",
    type=click.Choice(KINDS),
    default=None,
    help=f"launchd (macOS default) or systemd (elsewhere); also ${ENV_KIND}.",
)


@click.group("agent")
def agent_cli() -> None:
    """Run the daemon in the background: a LaunchAgent on macOS, a systemd user unit elsewhere."""
    if not structlog.is_configured():
        # Unconfigured structlog prints every debug line; send ours to the log file instead.
        from daemon.logs import setup_logging

        setup_logging(file=paths.default_log_file(), console_level="warning")


@agent_cli.command("install")
@_KIND_OPTION
@click.option(
    "--program",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    hidden=True,
    help="The tinyserve-backup executable the agent runs (default: the one running this).",
)
def install_cmd(kind: str | None, program: Path | None) -> None:
    """Install or upgrade the agent and (re)start it (what `make install-agent` runs)."""
    result = install_agent(kind, _config_path_from_ctx(), program or default_program())
    what = "LaunchAgent" if result.kind == "launchd" else "systemd user unit"
    if result.config_created:
        click.echo(
            f"Config created: {result.config_path} (mode 0600). Edit it (destination, schedule), "
            "then run `make install-agent` again to restart the agent with it."
        )
    else:
        click.echo(f"Config: {result.config_path} (kept as is)")
    click.echo(f"Agent: {result.unit_path} ({what})")
    click.echo(f"Program: {result.program}")
    click.echo("Restarted the running agent." if result.was_running else "Started the agent.")
    if result.crash_log is not None:
        click.echo(f"Crash output (if any): {result.crash_log}")
    else:
        click.echo("Crash output (if any): journalctl --user -u tinyserve-backup")
    click.echo("Logs: make logs  (or: tinyserve-backup logs -f)")
    if result.kind == "systemd":
        click.echo("To keep it running while you are logged out: loginctl enable-linger $USER")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@agent_cli.command("uninstall")
@_KIND_OPTION
@click.option("--keep-venv", is_flag=True, help="Leave the agent's venv in place.")
def uninstall_cmd(kind: str | None, keep_venv: bool) -> None:
    """Stop and remove the agent and its venv; config, credentials and logs stay."""
    result = uninstall_agent(kind, config_path=_config_path_from_ctx(), remove_venv=not keep_venv)
    if result.was_running:
        click.echo("Stopped the agent.")
    for path in result.removed:
        click.echo(f"Removed: {path}")
    if not result.removed:
        click.echo("Nothing to remove: no agent was installed.")
    for what, where in result.kept:
        click.echo(f"Kept {what}: {where}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@agent_cli.command("status")
@_KIND_OPTION
def status_cmd(kind: str | None) -> None:
    """Whether the agent is installed and running."""
    st = agent_status(kind)
    click.echo(f"Agent: {st.unit_path} ({'installed' if st.installed else 'not installed'})")
    state = {True: "running", False: "not running", None: "unknown"}[st.running]
    click.echo(f"State: {state}" + (f" ({st.detail})" if st.detail else ""))
    if st.program is not None:
        click.echo(f"Program: {st.program}")


__all__ = [
    "LABEL",
    "UNIT_NAME",
    "AgentStatus",
    "InstallResult",
    "UninstallResult",
    "agent_cli",
    "agent_status",
    "install_agent",
    "render_plist",
    "render_unit",
    "uninstall_agent",
]
