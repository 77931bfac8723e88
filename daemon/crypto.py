"""Client-side encryption with age (work in progress: issue [7 of 8])."""

from __future__ import annotations

from typing import Any

from .errors import EncryptionError


def encryptor_from_config(cfg: Any) -> Any:
    if cfg.encryption.recipients:
        raise EncryptionError("encryption is configured but not available in this build")
    return None


def decryptor_from_config(cfg: Any) -> Any:
    return None
