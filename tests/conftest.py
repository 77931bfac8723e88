"""Shared fixtures: a real S3 server in its own process, a fault proxy, isolated user dirs."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from daemon.storage import LocalStorage, RetryPolicy, S3Settings, S3Storage
from tests.helpers.rootfactory import fake_path
from tests.helpers.s3server import REPO, FaultProxy, MotoServer, create_bucket, start_moto
from tests.helpers.writer import init_db


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_auth_server() -> Iterator[tuple[MotoServer, str, str, str]]:
    """A second moto server that enforces IAM auth, with one user allowed to use one bucket."""
    import boto3

    server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    kw = {
        "endpoint_url": server.endpoint,
        "region_name": "us-east-1",
        "aws_access_key_id": "admin",
        "aws_secret_access_key": "admin",
    }
    iam = boto3.client("iam", **kw)
    iam.create_user(UserName="backup")
    iam.put_user_policy(
        UserName="backup",
        PolicyName="all",
        PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}',
    )
    key = iam.create_access_key(UserName="backup")["AccessKey"]
    boto3.client("s3", **kw).create_bucket(Bucket="authbucket")
    yield server, "authbucket", key["AccessKeyId"], key["SecretAccessKey"]
    server.stop()


@pytest.fixture
def bucket(s3_server: MotoServer) -> str:
    name = f"t-{secrets.token_hex(6)}"
    create_bucket(s3_server.endpoint, name)
    return name


FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.05, max_delay=0.5)


def s3_settings(endpoint: str, bucket: str, prefix: str = "tb", **kw: object) -> S3Settings:
    base: dict[str, object] = {
        "bucket": bucket,
        "prefix": prefix,
        "endpoint": endpoint,
        "region": "us-east-1",
        "addressing_style": "path",
        "access_key_id": "testing",
        "secret_access_key": "testing",
        "part_size": 5 * 1024 * 1024,
        "concurrency": 3,
        "retry": FAST_RETRY,
        "connect_timeout": 2.0,
        "read_timeout": 10.0,
    }
    base.update(kw)
    return S3Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def s3_storage(s3_server: MotoServer, bucket: str) -> AsyncIterator[S3Storage]:
    st = S3Storage(s3_settings(s3_server.endpoint, bucket))
    yield st
    await st.close()


@pytest.fixture
def fault_proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
async def proxied_storage(fault_proxy: FaultProxy, bucket: str) -> AsyncIterator[S3Storage]:
    st = S3Storage(s3_settings(fault_proxy.endpoint, bucket))
    yield st
    await st.close()


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    d = tmp_path / "dest"
    d.mkdir()
    return LocalStorage(d)


@pytest.fixture(autouse=True)
def isolated_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own HOME/XDG dirs so nothing touches the real user's files."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    monkeypatch.setenv("TINYSERVE_BACKUP_HOME", str(home / "tsb"))
    monkeypatch.setenv("FAKE_CALLS_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_SECURITY_STATE", str(tmp_path / "keychain.json"))
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(tmp_path / "docker-state"))
    monkeypatch.setenv("PATH", fake_path())
    for var in ("TINYSERVE_ROOT", "TINYSERVE_BACKUP_CONFIG", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return home


async def wait_for(cond: Callable[[], bool], within: float, what: str) -> None:
    """Wait (bounded) until ``cond()`` holds, without blocking the event loop."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a child process, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        timeout=timeout,
        cwd=str(REPO),
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A WAL-mode ``state.db`` (the writer helper's schema) in an otherwise empty root."""
    root = tmp_path / "root"
    root.mkdir()
    path = root / "state.db"
    init_db(path)
    return path
