"""Where the S3 secret lives: the macOS login Keychain, or a 0600 file everywhere else.

Two backends behind three functions:

* ``keychain`` — a generic password in the login Keychain, service ``dev.tinyserve.backup``,
  account = the access key id (not secret, and what a person sees in Keychain Access), password =
  the secret access key.  Driven through ``/usr/bin/security``.  The secret never goes into a
  child's argv: ``security add-generic-password -w SECRET`` would show it to ``ps``, and a bare
  trailing ``-w`` makes ``security`` prompt through readpassphrase(3), which reads the controlling
  terminal (not our pipe) whenever there is one and truncates at 128 bytes.  Instead the whole
  command line goes to ``security -i`` (interactive mode) on stdin, where ``security`` parses it
  itself; the inner command's exit status becomes ``security``'s.
* ``file`` — ``${XDG_CONFIG_HOME:-~/.config}/tinyserve-backup/credentials`` (or
  ``$TINYSERVE_BACKUP_CREDENTIALS``), in the AWS shared-credentials format so a person can use it by
  hand (``AWS_SHARED_CREDENTIALS_FILE=… aws s3 ls``).  Created 0600 whatever the umask, replaced
  atomically, and refused on read when group or others can read it.

``load_credentials`` returns ``None`` when nothing is stored or when the config names an AWS
profile: the caller then lets botocore's default chain (environment, profile, ``credential_process``,
SSO, instance metadata) find credentials.

Nothing here logs, prints or raises with a secret in it.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Final, Literal, NamedTuple

import structlog

from daemon.errors import CredentialsError
from daemon.fsutil import make_private_dirs, write_atomic

log = structlog.get_logger(__name__)

SERVICE: Final = "dev.tinyserve.backup"
KEYCHAIN_LABEL: Final = "tinyserve-backup S3 credentials"
ENV_STORE: Final = "TINYSERVE_BACKUP_CREDENTIAL_STORE"
ENV_FILE: Final = "TINYSERVE_BACKUP_CREDENTIALS"
FILE_SECTION: Final = "default"
SECURITY_TIMEOUT_S: Final = 30.0
# `security` exits with 44 (errSecItemNotFound) when no item matches.
_SECURITY_NOT_FOUND: Final = 44

Backend = Literal["keychain", "file"]


class Credentials(NamedTuple):
    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:  # a stray log or traceback must not show the secret
        return f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"

    def __str__(self) -> str:
        return self.__repr__()


# ---------------------------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------------------------


def credentials_path() -> Path:
    """The credentials file: ``$TINYSERVE_BACKUP_CREDENTIALS``, else under the XDG config dir."""
    override = os.environ.get(ENV_FILE)
    if override:
        return Path(override).expanduser().absolute()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser().absolute() / "tinyserve-backup" / "credentials"


def keychain_available() -> bool:
    return shutil.which("security") is not None


def select_backend(backend: str | None = None) -> Backend:
    """Explicit choice, then ``$TINYSERVE_BACKUP_CREDENTIAL_STORE``, then Keychain on macOS."""
    choice = backend or os.environ.get(ENV_STORE) or ""
    if choice:
        if choice not in ("keychain", "file"):
            raise CredentialsError(
                f"unknown credential store {choice!r}",
                fix=f"use 'keychain' or 'file' (in ${ENV_STORE} or the option)",
            )
        if choice == "keychain" and not keychain_available():
            raise CredentialsError(
                "the Keychain credential store needs the `security` tool, which is not on PATH",
                fix=f"use the file store: set {ENV_STORE}=file",
            )
        return "keychain" if choice == "keychain" else "file"
    if sys.platform == "darwin" and keychain_available():
        return "keychain"
    return "file"


def describe(backend: Backend, path: Path | None = None) -> str:
    """Where secrets go, in words a person can act on (never the secret)."""
    if backend == "keychain":
        return f"the macOS login Keychain (service {SERVICE})"
    return str(path or credentials_path())


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def store_secret(
    access_key_id: str,
    secret: str,
    *,
    backend: str | None = None,
    path: Path | None = None,
) -> str:
    """Store the key pair, replacing what was there; returns where it went (for the user)."""
    _check_value("access key id", access_key_id)
    _check_value("secret access key", secret)
    chosen = select_backend(backend)
    try:
        if chosen == "keychain":
            _keychain_store(access_key_id, secret)
        else:
            _file_store(path or credentials_path(), access_key_id, secret)
    except CredentialsError as exc:
        # Belt and braces: whatever a tool printed, the secret never leaves in an error.
        if secret in exc.message or secret in exc.fix:
            raise CredentialsError(
                exc.message.replace(secret, "***"), exc.fix.replace(secret, "***")
            ) from None
        raise
    where = describe(chosen, path)
    log.info("credentials_stored", store=chosen, where=where, access_key_id=access_key_id)
    return where


def load_credentials(
    *,
    profile: str | None = None,
    backend: str | None = None,
    path: Path | None = None,
) -> Credentials | None:
    """The stored key pair, or ``None`` to let botocore's default credential chain decide.

    A configured AWS ``profile`` (which may use ``credential_process`` or SSO) always wins over
    stored keys, so this returns ``None`` without looking.  Without an explicit backend the
    Keychain is tried first where it exists, then the file.
    """
    if profile:
        return None
    file_path = path or credentials_path()
    explicit = backend or os.environ.get(ENV_STORE)
    chosen = select_backend(backend)
    if chosen == "keychain":
        found = _keychain_load()
        if found is not None or explicit:
            return found
    return _file_load(file_path)


def delete_credentials(
    *,
    backend: str | None = None,
    path: Path | None = None,
) -> bool:
    """Remove stored credentials (every backend in reach unless one is named); True if any was."""
    explicit = backend or os.environ.get(ENV_STORE)
    removed = False
    if explicit:
        targets: list[Backend] = [select_backend(explicit)]
    else:
        on_macos = sys.platform == "darwin" and keychain_available()
        targets = ["keychain", "file"] if on_macos else ["file"]
    for target in targets:
        if target == "keychain":
            removed = _keychain_delete_all() or removed
        else:
            file_path = path or credentials_path()
            try:
                file_path.unlink()
                removed = True
            except FileNotFoundError:
                pass
    log.info("credentials_deleted", removed=removed)
    return removed


# ---------------------------------------------------------------------------------------------
# Keychain backend
# ---------------------------------------------------------------------------------------------


def _check_value(what: str, value: str) -> None:
    if not value:
        raise CredentialsError(f"the {what} is empty", fix="pass the full value")
    # Both backends are line-oriented (`security -i` reads one command per line; the INI file
    # strips surrounding blanks), so such values could only be stored damaged.
    if any(ch in value for ch in "\r\n\0") or value != value.strip():
        raise CredentialsError(
            f"the {what} contains a line break, NUL or surrounding blanks",
            fix="paste the value again without extra characters",
        )


def _security(args: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("security")
    if exe is None:
        raise CredentialsError(
            "the `security` tool is not on PATH",
            fix=f"use the file credential store: set {ENV_STORE}=file",
        )
    try:
        return subprocess.run(
            [exe, *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=SECURITY_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CredentialsError(
            f"`security {args[0]}` did not answer within {SECURITY_TIMEOUT_S:.0f} s",
            fix="unlock the login keychain (`security unlock-keychain`) and try again",
        ) from exc


def _scrub(text: str, *secret_values: str) -> str:
    """First meaningful line of a tool's message, with any secret blanked out."""
    for value in secret_values:
        if value:
            text = text.replace(value, "***")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def _security_quote(value: str) -> str:
    # `security -i` splits its input line like a shell: double quotes group, backslash escapes.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _keychain_account() -> str | None:
    """The account (= access key id) of our item, read from its attributes; None if absent."""
    proc = _security(["find-generic-password", "-s", SERVICE])
    if proc.returncode == _SECURITY_NOT_FOUND:
        return None
    if proc.returncode != 0:
        raise CredentialsError(
            f"could not read the Keychain item {SERVICE}: {_scrub(proc.stderr)}",
            fix="unlock the login keychain (`security unlock-keychain`) or store the credentials "
            "again with `tinyserve-backup config`",
        )
    return _parse_account(proc.stdout)


_ACCT_LINE = re.compile(r'^\s*"acct"<blob>=(?P<value>.*)$')
_QUOTED = re.compile(r'^"(?P<text>.*)"$')
_HEX = re.compile(r"^0x(?P<hex>[0-9A-Fa-f]+)")


def _parse_account(attributes: str) -> str | None:
    for line in attributes.splitlines():
        m = _ACCT_LINE.match(line)
        if not m:
            continue
        value = m.group("value").strip()
        if value == "<NULL>":
            return None
        # Non-printable values come as 0xHEX followed by a quoted rendering; prefer the hex.
        hx = _HEX.match(value)
        if hx:
            try:
                return bytes.fromhex(hx.group("hex")).decode("utf-8")
            except ValueError:
                return None
        q = _QUOTED.match(value)
        if q:
            return q.group("text")
    return None


def _keychain_store(access_key_id: str, secret: str) -> None:
    previous = _keychain_account()
    line = " ".join(
        [
            "add-generic-password",
            "-U",
            "-a",
            _security_quote(access_key_id),
            "-s",
            _security_quote(SERVICE),
            "-l",
            _security_quote(KEYCHAIN_LABEL),
            "-w",
            _security_quote(secret),
        ]
    )
    proc = _security(["-i"], stdin=line + "\n")
    if proc.returncode != 0:
        raise CredentialsError(
            f"could not store the secret in the login Keychain: {_scrub(proc.stderr or proc.stdout, secret)}",
            fix=f"unlock the login keychain (`security unlock-keychain`), or use the file store "
            f"({ENV_STORE}=file)",
        )
    if previous is not None and previous != access_key_id:
        # One item per service: drop the old key pair so a reader never picks the stale one.
        _security(["delete-generic-password", "-a", previous, "-s", SERVICE])


def _keychain_load() -> Credentials | None:
    account = _keychain_account()
    if account is None:
        return None
    proc = _security(["find-generic-password", "-a", account, "-s", SERVICE, "-w"])
    if proc.returncode == _SECURITY_NOT_FOUND:
        return None
    if proc.returncode != 0:
        raise CredentialsError(
            f"could not read the secret from the Keychain item {SERVICE}: {_scrub(proc.stderr)}",
            fix="unlock the login keychain (`security unlock-keychain`), or allow `security` "
            "access to the item in Keychain Access",
        )
    secret = proc.stdout.rstrip("\n")
    if not secret:
        raise CredentialsError(
            f"the Keychain item {SERVICE} holds an empty secret",
            fix="store the credentials again with `tinyserve-backup config`",
        )
    return Credentials(account, secret)


def _keychain_delete_all() -> bool:
    removed = False
    # Bounded: each round removes one item; a handful is more than we ever create.
    for _ in range(16):
        proc = _security(["delete-generic-password", "-s", SERVICE])
        if proc.returncode != 0:
            break
        removed = True
    return removed


# ---------------------------------------------------------------------------------------------
# File backend
# ---------------------------------------------------------------------------------------------

_FILE_HEADER = """\
# tinyserve-backup credentials. Keep this file private (mode 0600); never commit or share it.
# Written by `tinyserve-backup config`. Same format as ~/.aws/credentials, so by hand:
#   AWS_SHARED_CREDENTIALS_FILE="{path}" aws s3 ls s3://BUCKET/
"""


def _file_store(path: Path, access_key_id: str, secret: str) -> None:
    path = path.expanduser().absolute()
    try:
        make_private_dirs(path.parent)
    except OSError as exc:
        raise CredentialsError(
            f"cannot create {path.parent}: {exc.strerror}",
            fix=f"check the permissions of {path.parent.parent}, or set {ENV_FILE}",
        ) from exc
    text = (
        _FILE_HEADER.format(path=path)
        + f"[{FILE_SECTION}]\n"
        + f"aws_access_key_id = {access_key_id}\n"
        + f"aws_secret_access_key = {secret}\n"
    )
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise CredentialsError(
            f"cannot write the credentials file {path}: {exc.strerror}",
            fix=f"check the permissions of {path.parent}, or set {ENV_FILE}",
        ) from exc


def _file_load(path: Path) -> Credentials | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(
            f"cannot read the credentials file {path}: {exc.strerror}",
            fix=f"chmod 600 {path} (it must belong to you)",
        ) from exc
    try:
        # Checked on the open descriptor, so a swap between check and read changes nothing.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsError(
                f"the credentials file {path} is not a regular file",
                fix=f"remove {path} and store the credentials again with `tinyserve-backup config`",
            )
        if st.st_uid != os.getuid():
            raise CredentialsError(
                f"the credentials file {path} belongs to another user (uid {st.st_uid})",
                fix=f"chown {os.getuid()} {path} && chmod 600 {path}",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise CredentialsError(
                f"the credentials file {path} is readable or writable by group or others "
                f"(mode {mode:04o}); refusing to use it",
                fix=f"chmod 600 {path}",
            )
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return _parse_credentials_file(path, b"".join(chunks))


def _parse_credentials_file(path: Path, data: bytes) -> Credentials:
    fix = f"fix {path} by hand, or store the credentials again with `tinyserve-backup config`"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CredentialsError(f"the credentials file {path} is not UTF-8 text", fix=fix) from exc
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        # configparser quotes the offending line, which may be the secret: keep only its number.
        lineno = getattr(exc, "lineno", None)
        if lineno is None and isinstance(exc, configparser.ParsingError) and exc.errors:
            lineno = exc.errors[0][0]
        where = f" at line {lineno}" if lineno else ""
        raise CredentialsError(f"the credentials file {path} is not valid INI{where}", fix=fix) from None
    if not parser.has_section(FILE_SECTION):
        raise CredentialsError(f"the credentials file {path} has no [{FILE_SECTION}] section", fix=fix)
    section = parser[FILE_SECTION]
    key_id = section.get("aws_access_key_id", "").strip()
    secret = section.get("aws_secret_access_key", "").strip()
    missing = [
        name
        for name, value in (("aws_access_key_id", key_id), ("aws_secret_access_key", secret))
        if not value
    ]
    if missing:
        raise CredentialsError(
            f"the credentials file {path} lacks {' and '.join(missing)} in [{FILE_SECTION}]",
            fix=fix,
        )
    return Credentials(key_id, secret)
