"""Where the tool keeps its own files (never inside the tinyserve root it protects)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

APP = "tinyserve-backup"


def _home() -> Path:
    return Path(os.path.expanduser("~"))


def is_macos() -> bool:
    return sys.platform == "darwin"


def default_root() -> Path:
    if is_macos():
        return _home() / "Library" / "Application Support" / "tinyserve"
    return Path(os.environ.get("XDG_DATA_HOME") or _home() / ".local" / "share") / "tinyserve"


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or _home() / ".config") / APP


def default_config_path() -> Path:
    return config_dir() / "config.yaml"


def data_home() -> Path:
    """The tool's own data: the agent's venv, state, spool, and the default local destination."""
    env = os.environ.get("TINYSERVE_BACKUP_HOME")
    if env:
        return Path(env).expanduser()
    if is_macos():
        return _home() / "Library" / "Application Support" / APP
    return Path(os.environ.get("XDG_DATA_HOME") or _home() / ".local" / "share") / APP


def state_dir() -> Path:
    return data_home() / "state"


def default_log_file() -> Path:
    if is_macos() and not os.environ.get("TINYSERVE_BACKUP_HOME"):
        return _home() / "Library" / "Logs" / APP / f"{APP}.log"
    return data_home() / "logs" / f"{APP}.log"


def default_local_destination() -> Path:
    return data_home() / "backups"


def root_key(root: Path) -> str:
    """A short stable name for a root, so per-root files (lock, status) never collide."""
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


def resource(kind: str, name: str) -> Path:
    """A file shipped with the program: ``kind`` is "launchd" or "config".

    In a wheel they live in ``daemon.launchd`` / ``daemon.config_examples``; in a source checkout
    (or an editable install imported from it) they are the repository's own launchd/ and config/.
    """
    from importlib.resources import files

    package = {"launchd": "daemon.launchd", "config": "daemon.config_examples"}[kind]
    try:
        candidate = Path(str(files(package) / name))
        if candidate.is_file():
            return candidate
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / kind / name
