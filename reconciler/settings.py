"""Settings: one documented model, layered defaults < config file < environment < flags.

The config file is TOML (``/etc/reconciler/config.toml``, or ``--config``); each key is a field
name below. Every field can also be set as ``RECONCILER_<FIELD>`` in the environment, and most
as a command-line flag. ``systemd/config.toml`` is a commented example of every setting.

Values only: turning them into a source, a store, a backend or a plan policy is
:mod:`reconciler.app.wiring`'s job, so this module imports nothing of the reconciler's.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reconciler.events import truncate

DEFAULT_CONFIG = Path("/etc/reconciler/config.toml")
CLI_KEY = Path("~/.bacalhau/user_id.pem")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class SettingsError(Exception):
    """The configuration is unusable; the message names the source and the field."""


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: Settings in seconds: each also accepts ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"``, as the
#: flags do, so a config file and a command line read the same.
DURATIONS = ("git_interval", "request_timeout", "resolve_delay", "backoff_base", "backoff_max",
             "debounce", "max_delay", "resync_interval", "poll_interval", "shutdown_deadline",
             "lease")


def parse_duration(value: object) -> object:
    """``"30s"`` -> 30.0; numbers and anything else pass through for the field to judge."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * _UNITS[unit]
            except ValueError:
                return value
    try:
        return float(text)
    except ValueError:
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECONCILER_", extra="forbid", frozen=True)

    # --- what to reconcile, against what -------------------------------------------------
    manifests: Path = Field(Path("manifests"), description="The folder of job manifests "
                            "(or a symlink to one that a syncer swaps).")
    endpoint: str = Field("http://127.0.0.1:1234", description="Base URL of the requester.")
    api_prefix: str = Field("/api/v1", description="Path prefix of the requester API.")
    api: Literal["auto", "legacy", "orchestrator"] = Field(
        "auto", description="Which API the requester speaks: auto asks GET "
        "/api/v1/agent/version (v1.5+: orchestrator, by name from v1.8, by label before; a "
        "404: legacy); legacy is the signed V1beta1 API of Bacalhau <= 1.4.")
    namespace: str = Field("default", min_length=1, description="Orchestrator namespace of "
                           "the jobs.")
    instance_label: str = Field(
        "default", pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$",
        description="Value of the reconciler-instance label on orchestrator jobs: two "
        "reconcilers sharing a namespace must differ; daemons sharing one database (HA) must "
        "not (they manage the same jobs).")
    api_key: SecretStr | None = Field(None, description="Orchestrator API key (Bearer). "
                                      "Default: $CREDENTIALS_DIRECTORY/api-key, then "
                                      "BACALHAU_API_KEY.")
    api_username: str | None = Field(None, description="Orchestrator user (Basic auth), with "
                                     "api_password; default BACALHAU_API_USERNAME.")
    api_password: SecretStr | None = Field(None, description="Its password; default "
                                           "BACALHAU_API_PASSWORD.")
    key: Path | None = Field(None, description="Signing key (RSA or Ed25519 PEM). Default: "
                             "$CREDENTIALS_DIRECTORY/signing-key, then ~/.bacalhau/user_id.pem.")
    state: Path | str | None = Field(None, description="State database: a SQLite file, or "
                                     "postgresql://user@host/db for several daemons on one "
                                     "database (one leads). Default: $STATE_DIRECTORY/state.db, "
                                     "else ~/.local/state/reconciler.")
    work_dir: Path | None = Field(None, description="Local files (the git working folder). "
                                  "Default: beside a SQLite state, else $STATE_DIRECTORY, "
                                  "else ~/.local/state/reconciler.")
    lease: float = Field(15.0, ge=1, le=3600, description="PostgreSQL state: seconds a leader's "
                         "lease lasts (renewed every third of it); a standby takes over within "
                         "about this long after the leader dies.")
    instance: str | None = Field(None, max_length=200, description="This daemon's name in the "
                                 "lease (status, events). Default: the host name.")
    # --- a git repository as the source (instead of a folder) ---------------------------
    git_url: str | None = Field(None, description="Follow this repository: fetched into the "
                                "state directory, reconciled from immutable snapshots.")
    git_ref: str = Field("main", description="Branch or tag to follow.")
    git_path: str = Field("", description="Folder of manifests inside the repository.")
    git_interval: float = Field(30.0, gt=0, description="Seconds between fetches (SIGUSR1 or "
                                "POST /sync fetch at once); failures back off up to 10x.")
    # --- how careful to be -----------------------------------------------------------------
    allow_empty: bool = Field(False, description="Treat an empty folder as 'cancel everything' "
                              "instead of 'not ready'.")
    mass_cancel_ratio: float = Field(0.5, ge=0, le=1, description="A pass that would cancel "
                                     "more than this share of live jobs...")
    mass_cancel_min: int = Field(3, ge=0, description="...and more than this many is blocked "
                                 "until `apply --allow-mass-cancel`.")
    mass_cancel_window: float = Field(600.0, gt=0, le=7 * 86400, description="Cancels are "
                                      "counted over this many seconds (kept in the store), so "
                                      "removals one at a time meet the same guard.")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once.")
    request_timeout: float = Field(30.0, gt=0, description="Seconds before a request is given "
                                   "up (a submit then counts as outcome unknown).")
    resolve_confirmations: int = Field(3, ge=1, description="Empty uid lookups needed before "
                                       "an in-doubt submission is sent again.")
    resolve_delay: float = Field(0.5, ge=0, description="Seconds between those lookups "
                                 "(growing linearly).")
    backoff_base: float = Field(10.0, gt=0, description="First retry delay of a failed action "
                                "or a resubmitted job (doubles each attempt).")
    backoff_max: float = Field(600.0, gt=0, description="Cap of that delay.")
    # --- the daemon ----------------------------------------------------------------------
    debounce: float = Field(0.15, ge=0, description="A changed file is acted on once it has "
                            "been quiet this long (by its events and its mtime).")
    removal_grace: float = Field(2.0, ge=0, description="A recorded manifest must stay missing "
                                 "this long before its job counts as removed (slow editor "
                                 "saves, git checkouts).")
    max_delay: float = Field(1.0, gt=0, description="A pass runs this long after a file's "
                             "first change even if it keeps changing (a file written less than "
                             "`debounce` ago still waits).")
    resync_interval: float = Field(60.0, gt=0, description="A full pass runs at least this "
                                   "often, events or not.")
    poll_interval: float = Field(10.0, gt=0, description="How often live jobs are listed to "
                                 "record completions, failures and drift.")
    poll_budget: float = Field(0.005, gt=0, le=1, description="Share of one core polling may "
                               "use: with many jobs the interval stretches to keep within it.")
    watch: Literal["inotify", "poll"] = Field("inotify", description="poll for NFS and other "
                                              "file systems without inotify.")
    shutdown_deadline: float = Field(10.0, ge=0, description="Seconds in-flight requests get "
                                     "to finish on SIGTERM.")
    metrics_listen: str | None = Field(None, description="host:port of /metrics, /healthz and "
                                       "/readyz (off by default).")
    log_format: Literal["auto", "json", "console"] = Field("auto", description="Event format.")
    probe_listen: str | None = Field(None, description="host:port of the job-selection probe "
                                     "(POST /probe) that compute nodes call; off when unset.")
    approval_max: int = Field(1000, ge=1, description="Approval requests kept in the store at "
                              "most; when full of pending ones, new probes are answered 503.")
    approval_retention: float = Field(86400.0, gt=0, description="Seconds a decided, or "
                                      "still pending, approval request is kept.")

    @field_validator("state", mode="before")
    @classmethod
    def _state(cls, value: object) -> object:
        """A PostgreSQL URL stays text (a path would fold its ``//``); anything else is a path."""
        if isinstance(value, str):
            return value if value.startswith(POSTGRES_SCHEMES) else Path(value)
        return value

    @field_validator(*DURATIONS, mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value)

    def key_path(self) -> Path:
        """The first that exists of: --key, the systemd credential, the Bacalhau CLI key."""
        if self.key is not None:
            return self.key.expanduser()
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials and (Path(credentials) / "signing-key").exists():
            return Path(credentials) / "signing-key"
        return CLI_KEY.expanduser()


def api_credentials(settings: Settings) -> tuple[str | None, str | None, str | None]:
    """(api key, user, password) for the orchestrator: the config (or RECONCILER_*), else the
    systemd credential ``api-key``, else the Bacalhau CLI's variables. A key and a user from
    anywhere together is an error, as in the Bacalhau CLI. The message never holds a secret."""
    key = settings.api_key.get_secret_value() if settings.api_key else None
    user = settings.api_username
    password = settings.api_password.get_secret_value() if settings.api_password else None
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if key is None and credentials and (Path(credentials) / "api-key").is_file():
        try:
            key = (Path(credentials) / "api-key").read_text().strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{credentials}/api-key: cannot read ({type(exc).__name__})"
                                ) from None
    key = key or os.environ.get("BACALHAU_API_KEY") or None
    user = user or os.environ.get("BACALHAU_API_USERNAME") or None
    password = password or os.environ.get("BACALHAU_API_PASSWORD") or None
    if key and (user or password):
        raise SettingsError("api_key and api_username/api_password are both set (config, "
                            "$CREDENTIALS_DIRECTORY/api-key or BACALHAU_API_*): give one")
    if (user is None) != (password is None):
        raise SettingsError("api_username and api_password go together: one is missing")
    return key, user, password


def load_settings(config: Path | None = None, **flags: Any) -> Settings:
    """Build the settings; ``flags`` that are None were not given on the command line."""
    file_values = _read_config(config)
    try:
        from_env = Settings()
        env_values = {name: getattr(from_env, name) for name in from_env.model_fields_set}
        merged = {**file_values, **env_values,
                  **{k: v for k, v in flags.items() if v is not None}}
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(_render(exc, config)) from None


def _read_config(config: Path | None) -> dict[str, Any]:
    path = config or DEFAULT_CONFIG
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        if config is not None:
            raise SettingsError(f"{config}: config file not found") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {truncate(str(exc), 200)}") from None
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 only; a Latin-1 'é' in a comment used to kill the daemon on SIGHUP.
        raise SettingsError(f"{path}: not UTF-8 (byte {exc.start}): TOML files must be "
                            "UTF-8") from None
    except RecursionError:
        # tomllib recurses once per level of nesting (`a = [[[[...`).
        raise SettingsError(f"{path}: invalid TOML: nested too deeply") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:  # anything else tomllib refuses: still a config error
        raise SettingsError(f"{path}: invalid TOML: {truncate(str(exc), 200)}") from None


def _render(exc: ValidationError, config: Path | None) -> str:
    where = str(config or DEFAULT_CONFIG) + " / RECONCILER_* / flags"
    problems = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
        for e in exc.errors(include_input=False, include_url=False)
    )
    return f"invalid settings ({where}): {truncate(problems)}"
