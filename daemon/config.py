"""The YAML config: loading, validation with helpful errors, and comment-preserving edits."""

from __future__ import annotations

import difflib
import io
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import paths
from .errors import ConfigError
from .fsutil import write_atomic

ENV_CONFIG = "TINYSERVE_BACKUP_CONFIG"
ENV_ROOT = "TINYSERVE_ROOT"
TINYSERVED_LABEL = "dev.tinyserve.daemon"


def expand(value: str) -> str:
    return os.path.expanduser(os.path.expandvars(value))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _default_stop() -> list[str]:
    if paths.is_macos():
        return ["launchctl", "bootout", f"gui/{os.getuid()}/{TINYSERVED_LABEL}"]
    return []


def _default_start() -> list[str]:
    if paths.is_macos():
        plist = Path("~/Library/LaunchAgents").expanduser() / f"{TINYSERVED_LABEL}.plist"
        return ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(plist)]
    return []


class Destination(_Model):
    url: str = Field(default_factory=lambda: f"file://{paths.default_local_destination()}")
    endpoint: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    profile: str | None = None
    part_size_mb: int = Field(default=5, ge=5, le=1024)
    concurrency: int = Field(default=4, ge=1, le=32)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        v = expand(v.strip())
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("s3", "file"):
            raise ValueError(f"unknown destination scheme in {v!r}: use s3://bucket/prefix or file:///path")
        if scheme == "s3" and not v[5:].split("/", 1)[0]:
            raise ValueError("s3:// URL needs a bucket name: s3://bucket/prefix")
        if scheme == "file" and not v[7:].startswith("/"):
            raise ValueError("file:// URL needs an absolute path: file:///Volumes/Backup/tinyserve")
        return v

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = expand(v.strip())
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"endpoint {v!r} must be an http(s) URL like https://s3.example.com")
        return v.rstrip("/")

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def bucket(self) -> str:
        return self.url[5:].split("/", 1)[0] if self.scheme == "s3" else ""

    @property
    def prefix(self) -> str:
        """The prefix with `{hostname}` filled in, so machines sharing a bucket stay apart."""
        if self.scheme != "s3":
            return ""
        rest = self.url[5:].split("/", 1)
        raw = rest[1] if len(rest) > 1 else ""
        return raw.replace("{hostname}", short_hostname()).strip("/")

    @property
    def local_path(self) -> Path:
        return Path(self.url[7:].replace("{hostname}", short_hostname()))

    @property
    def resolved_url(self) -> str:
        """The URL as used, `{hostname}` filled in: what a user looks for in the bucket."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"file://{self.local_path}"


def short_hostname() -> str:
    name = socket.gethostname().split(".")[0] or "localhost"
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


class Tinyserved(_Model):
    stop: list[str] = Field(default_factory=_default_stop)
    start: list[str] = Field(default_factory=_default_start)
    status: list[str] = Field(default_factory=lambda: ["tinyserve", "status"])
    timeout_seconds: float = Field(default=60, gt=0)
    # How long a restore asks `status` for tinyserved to come up after the start, before warning.
    ready_seconds: float = Field(default=30, ge=0)


class Schedule(_Model):
    timezone: str | None = None
    partial: str | None = "0 3 * * 1-6"
    full: str | None = "0 3 * * 0"
    services: str | None = None
    catch_up: bool = True
    lock_wait_seconds: float = Field(default=900, ge=0)

    @field_validator("partial", "full", "services", mode="before")
    @classmethod
    def _off_is_none(cls, v: Any) -> Any:
        # YAML reads a bare `off`/`no`/`false` as a boolean: all mean "not scheduled".
        return None if v is False else v

    @field_validator("partial", "full", "services")
    @classmethod
    def _check_cron(cls, v: str | None) -> str | None:
        if v is None or v.strip() in ("", "off"):
            return None
        from .scheduler import parse_cron

        try:
            parse_cron(v, None)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return v.strip()

    @field_validator("timezone")
    @classmethod
    def _check_tz(cls, v: str | None) -> str | None:
        if v is not None:
            check_timezone(v)
        return v


def check_timezone(name: str) -> None:
    """ValueError unless ``name`` is a time zone this machine knows."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use a name like Europe/Berlin)") from None


class RetentionRule(_Model):
    max_age_days: float | None = Field(default=None, ge=0)
    keep_last: int | None = Field(default=None, ge=0)
    keep_daily: int | None = Field(default=None, ge=0)
    keep_weekly: int | None = Field(default=None, ge=0)
    keep_monthly: int | None = Field(default=None, ge=0)


class Retention(_Model):
    partial: RetentionRule = Field(default_factory=lambda: RetentionRule(max_age_days=7))
    full: RetentionRule = Field(default_factory=lambda: RetentionRule(max_age_days=28))
    services: RetentionRule = Field(default_factory=lambda: RetentionRule(max_age_days=7))
    incomplete_after_hours: float = Field(default=1, ge=0)


class Wal(_Model):
    enabled: bool = True
    snapshot_interval_hours: float = Field(default=24, gt=0)
    snapshot_after_segments: int = Field(default=10_000, ge=0)
    retention_hours: float = Field(default=24, gt=0)
    spool_dir: Path | None = None
    spool_max_mb: int = Field(default=256, ge=1)
    checkpoint_pages: int = Field(default=1000, ge=1)
    truncate_mb: int = Field(default=64, ge=1)
    poll_interval_seconds: float = Field(default=2.0, gt=0)
    debounce_ms: int = Field(default=50, ge=0)
    # Under sustained writes, at most one segment upload per interval (a PUT each): the knob
    # between lag and request count.
    upload_interval_ms: int = Field(default=200, ge=0, le=3_600_000)

    @field_validator("spool_dir", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return Path(expand(str(v))) if v is not None else v


Command = list[str] | str


class Hooks(_Model):
    pre: Command | None = None
    post: Command | None = None
    timeout_seconds: float = Field(default=600, gt=0)


class Compression(_Model):
    level: int = Field(default=3, ge=1, le=19)
    # zstd worker threads: -1 uses every core (like `zstd -T0`), 0 compresses in the calling thread.
    threads: int = Field(default=-1, ge=-1)


class Encryption(_Model):
    recipients: list[str] = Field(default_factory=list)
    identity_file: Path | None = None

    @field_validator("identity_file", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return Path(expand(str(v))) if v is not None else v

    @field_validator("recipients")
    @classmethod
    def _check(cls, v: list[str]) -> list[str]:
        for r in v:
            if not (r.startswith("age1") or r.startswith("ssh-ed25519 ") or r.startswith("ssh-rsa ")):
                raise ValueError(f"{r[:20]!r}… is not an age recipient (age1…) or SSH public key")
        return v


class Alerts(_Model):
    notify: Literal["errors", "always", "never"] = "errors"
    healthchecks_url: str | None = None
    webhook_url: str | None = None
    macos_notifications: bool = True
    stale_after_hours: dict[str, float] = Field(default_factory=lambda: {"partial": 36.0, "full": 192.0})
    timeout_seconds: float = Field(default=10, gt=0)


class Logging(_Model):
    file: Path = Field(default_factory=paths.default_log_file)
    level: Literal["debug", "info", "warning", "error"] = "info"
    max_bytes: int = Field(default=5 * 1024 * 1024, ge=64 * 1024)
    backups: int = Field(default=3, ge=0)

    @field_validator("file", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return Path(expand(str(v)))


class Config(_Model):
    root: Path = Field(default_factory=paths.default_root)
    destination: Destination = Field(default_factory=Destination)
    tinyserved: Tinyserved = Field(default_factory=Tinyserved)
    schedule: Schedule = Field(default_factory=Schedule)
    retention: Retention = Field(default_factory=Retention)
    wal: Wal = Field(default_factory=Wal)
    hooks: dict[str, Hooks] = Field(default_factory=dict)
    compression: Compression = Field(default_factory=Compression)
    encryption: Encryption = Field(default_factory=Encryption)
    alerts: Alerts = Field(default_factory=Alerts)
    logging: Logging = Field(default_factory=Logging)

    # Not a config key: where this config came from, for messages and reloads.
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("root", mode="before")
    @classmethod
    def _expand_root(cls, v: Any) -> Any:
        return Path(expand(str(v)))

    @model_validator(mode="after")
    def _env_root(self) -> Config:
        env = os.environ.get(ENV_ROOT)
        if env:
            object.__setattr__(self, "root", Path(expand(env)))
        return self

    @property
    def state_dir(self) -> Path:
        return paths.state_dir()

    @property
    def spool_dir(self) -> Path:
        return self.wal.spool_dir or (paths.state_dir() / "spool" / paths.root_key(self.root))

    @property
    def db_path(self) -> Path:
        return self.root / "state.db"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def resolve_config_path(cli_value: str | os.PathLike[str] | None) -> Path:
    if cli_value:
        return Path(expand(str(cli_value)))
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(expand(env))
    return paths.default_config_path()


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of a key path in the YAML text, so errors point at the right place."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = Config
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            if model is Config or isinstance(part, int):
                return None
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif getattr(ann, "__origin__", None) is dict:
            model = ann.__args__[1]  # type: ignore[union-attr]
            # the next part is the dict key (a service name); skip it
            continue
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


# The member tags pydantic puts in an error's location for a union (`pre: list[str] | str`):
# not keys of the file.
_TYPE_TAG = re.compile(r"str|int|float|bool|list\[.*\]|dict\[.*\]")


def _key_path(err: Any) -> tuple[Any, ...]:
    return tuple(p for p in err["loc"] if not (isinstance(p, str) and _TYPE_TAG.fullmatch(p)))


def _friendly(exc: ValidationError, text: str, where: str) -> ConfigError:
    """The first problem in full, and where the others are: one round of fixes, not one each."""
    # in the file's order, so the one reported in full is the first a reader meets
    errors = sorted(exc.errors(), key=lambda e: _line_of(text, _key_path(e)) or 1 << 30)
    first = _friendly_one(errors[0], text, where)
    seen = {_key_path(errors[0])}
    more = []
    for err in errors[1:]:
        loc = _key_path(err)
        if loc not in seen:
            seen.add(loc)
            more.append(f"`{'.'.join(map(str, loc))}`")
    if not more:
        return first
    also = f"; also wrong: {', '.join(more[:5])}" + (" …" if len(more) > 5 else "")
    return ConfigError(first.message + also, first.fix)


def _friendly_one(err: Any, text: str, where: str) -> ConfigError:
    loc = _key_path(err)
    dotted = ".".join(str(p) for p in loc)
    line = _line_of(text, loc)
    at = f"{where}, line {line}" if line else where
    if err["type"] == "extra_forbidden":
        parent = loc[:-1]
        model = _model_at(parent) if parent else Config
        if model is None and parent and parent[0] == "hooks":
            model = Hooks
        choices = [k for k in (model.model_fields if model else {}) if k != "source"]
        guess = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        hint = (
            f"did you mean `{'.'.join([*map(str, parent), guess[0]])}`?"
            if guess
            else (f"known keys here: {', '.join(sorted(choices))}")
        )
        return ConfigError(f"unknown config key `{dotted}` ({at})", hint)
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return ConfigError(f"invalid `{dotted}` ({at}): {msg}", "fix that value in the config file")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: YAML keeps the last one
    silently, so a `wal:` block appended below the example's own dropped the first block's keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: the mapping it merges in is not a key given twice
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping reports it
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _DuplicateKey(str(key), first, line)
            seen[key] = line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, where: str) -> Any:
    """The YAML document, or a ConfigError naming the line (and a key given twice)."""
    try:
        return yaml.load(text, Loader=_StrictLoader) if text.strip() else {}  # a SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(
            f"`{exc.key}` is given twice in {where} (lines {exc.first} and {exc.again}); YAML would "
            "silently keep only the second",
            "merge the two into one block",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        line = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"YAML syntax error in {where}{line}: {problem}",
            "fix the YAML (indentation uses spaces; quote values containing ': ')",
        ) from None


def parse_config(text: str, where: str = "config") -> Config:
    data = _load_yaml(text, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a YAML mapping of keys to values", "see config/ for an example")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _friendly(exc, text, where) from None


def load_config(path: Path, *, missing_ok: bool = False) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            cfg = Config()
            object.__setattr__(cfg, "source", path)
            return cfg
        raise ConfigError(
            f"config file {path} does not exist",
            "create one with `tinyserve-backup config --bucket …` (or `--local DIR`), "
            "or copy config/tinyserve-backup.yaml from the repository",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    cfg = parse_config(text, str(path))
    object.__setattr__(cfg, "source", path)
    return cfg


# --------------------------------------------------------------------------------------------
# Editing (keeps the user's comments and key order)
# --------------------------------------------------------------------------------------------


def example_config_text() -> str:
    return paths.resource("config", "tinyserve-backup.yaml").read_text(encoding="utf-8")


def _yaml_rt() -> Any:
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096
    return y


def write_private(path: Path, text: str) -> None:
    """Write the config (or another private text file) atomically with mode 0600."""
    write_atomic(path, text)


def edit_config(path: Path, updates: dict[str, Any]) -> Config:
    """Set dotted keys (``schedule.full``) in the YAML file, validating before anything is written.

    A value of ``None`` removes the key.  A missing file starts from the packaged example.
    """
    y = _yaml_rt()
    try:
        original = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        original = example_config_text()
    _load_yaml(original, str(path))  # its errors name the line, and a key given twice
    try:
        doc = y.load(original) if original.strip() else None
    except Exception as exc:
        raise ConfigError(f"cannot edit {path}: it is not valid YAML ({exc})".splitlines()[0]) from None
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
    for dotted, value in updates.items():
        node = doc
        keys = dotted.split(".")
        for k in keys[:-1]:
            if k not in node or node[k] is None:
                from ruamel.yaml.comments import CommentedMap

                node[k] = CommentedMap()
            node = node[k]
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    buf = io.StringIO()
    y.dump(doc, buf)
    text = buf.getvalue()
    cfg = parse_config(text, str(path))
    write_private(path, text)
    object.__setattr__(cfg, "source", path)
    return cfg


def iter_secret_values(cfg: Config) -> Iterator[str]:
    """Values that look like secrets inside the config (URLs with tokens), for log redaction."""
    for url in (cfg.alerts.healthchecks_url, cfg.alerts.webhook_url):
        if url:
            yield url
