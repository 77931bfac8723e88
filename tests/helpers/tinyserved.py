"""The config and the call log the restore tests share: tinyserved stopped and started through the
stand-in `tinyserved-ctl` (tests/fakes), which records every call."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.config import Config, parse_config
from tests.helpers.rootfactory import RootInfo, make_root, read_calls

DB_FILES = ["state.db", "state.db-wal", "state.db-shm"]


def tinyserve_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> RootInfo:
    """A small generated root, with the stand-in tinyserved's state kept beside it."""
    monkeypatch.setenv("FAKE_TINYSERVED_STATE", str(tmp_path / "tinyserved.state"))
    return make_root(tmp_path / "tinyserve", size="tiny", seed=seed)


def cfg_for(root: Path, extra: str = "") -> Config:
    return parse_config(
        f"root: {root}\ncompression:\n  threads: 0\n"
        "tinyserved:\n  stop: [tinyserved-ctl, stop]\n  start: [tinyserved-ctl, start]\n"
        "  status: [tinyserve, status]\n" + extra
    )


def ctl_calls() -> list[list[str]]:
    return [c["args"] for c in read_calls(os.environ["FAKE_CALLS_LOG"], "tinyserved-ctl")]
