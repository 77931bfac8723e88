"""One exception hierarchy for the whole tool.

Every error a user can meet is a ``BackupError``: ``message`` names the problem, ``fix`` says what
to do about it.  The CLI prints ``error: <message> — <fix>`` on one line and exits with ``exit_code``;
nothing else ever reaches a user's terminal.  Messages must never contain a secret.
"""

from __future__ import annotations


class BackupError(Exception):
    """Base of every error the tool raises on purpose."""

    exit_code = 1
    default_fix = ""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix if fix is not None else self.default_fix

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.fix:
            return f"{text} — {' '.join(self.fix.split())}"
        return text


class ConfigError(BackupError):
    exit_code = 2
    default_fix = "edit the config file (see README: Config reference)"


class CredentialsError(BackupError):
    exit_code = 2
    default_fix = "run `tinyserve-backup config --access-key … --secret-key-stdin` to store credentials"


class StorageError(BackupError):
    """Talking to the destination failed."""

    exit_code = 3
    retryable = False


class TransientStorageError(StorageError):
    """Timeouts, 5xx, throttling, dropped connections: worth another try."""

    retryable = True
    default_fix = "check the network and the storage provider's status, then try again"


class EndpointUnreachableError(TransientStorageError):
    default_fix = "check the endpoint URL in the config and that the network is up"


class AccessDeniedError(StorageError):
    default_fix = "check the access key and secret (`tinyserve-backup config …`) and the bucket policy"


class BucketNotFoundError(StorageError):
    default_fix = "create the bucket first, or fix the bucket in `destination.url` in the config"


class ObjectNotFoundError(StorageError):
    default_fix = "run `tinyserve-backup list` to see what exists"


class PreconditionFailedError(StorageError):
    """A conditional request lost: the object already exists, or changed since it was read."""


class UnsupportedRequestError(StorageError):
    """The provider does not implement a request (HTTP 501), e.g. a conditional write."""


class LockError(BackupError):
    exit_code = 4
    default_fix = "wait for the other job to finish, or stop the process named above"


class LeaseHeldError(BackupError):
    exit_code = 4
    default_fix = "stop the other daemon shipping to this prefix, or give this machine its own prefix"


class BackupNotFoundError(BackupError):
    exit_code = 5
    default_fix = "run `tinyserve-backup list` to see the backups that exist"


class IntegrityError(BackupError):
    """A downloaded object or a restored database does not match what was recorded."""

    exit_code = 6
    default_fix = "run `tinyserve-backup verify --all` and restore from another backup"


class UnsafeArchiveError(IntegrityError):
    default_fix = "do not restore this archive; it tries to write outside the tinyserve root"


class EncryptionError(BackupError):
    exit_code = 7
    default_fix = "set `encryption.identity_file` to the age key that matches the backup's recipients"


class RestoreError(BackupError):
    exit_code = 8


class ServiceControlError(BackupError):
    exit_code = 9
    default_fix = "check `tinyserved.stop` / `tinyserved.start` in the config"


class DockerError(BackupError):
    exit_code = 10
    default_fix = "check that Docker is running and `docker` is on PATH"


class WalError(BackupError):
    exit_code = 11


class UsageError(BackupError):
    exit_code = 2
    default_fix = "see `tinyserve-backup --help`"


class AgentError(BackupError):
    exit_code = 12
