"""Environment variables (and an optional TOML file) -> one frozen `Settings`.

Every variable is declared once in `FIELDS`: its parser, default and meaning.
That table drives parsing, the `check-config` output and the documented
example in `config/telemetry.toml`, so they cannot drift apart. Parsing collects
every problem before raising one `ConfigError`, so a user fixes all at once.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigError
from agent.model import Resource

PREFIX = "TELEMETRY_"
T = TypeVar("T")

# CloudWatch Logs accepts only these retention periods (PutRetentionPolicy).
RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731,
                  1096, 1827, 2192, 2557, 2922, 3288, 3653)
# ContainerHostname / EndpointName / VariantName pattern (SageMaker API model).
_SAGEMAKER_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
# CloudWatch namespace: 1-255 ASCII of 0-9A-Za-z.-_/#: and space, not starting with ':'.
_NAMESPACE = re.compile(r"[0-9A-Za-z.\-_/#: ]{1,255}")
# CloudWatch Logs group names; braces admitted for {placeholders}.
_LOG_GROUP = re.compile(r"[A-Za-z0-9_\-/.#{}]{1,512}")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Invalid(ValueError):
    """Raised by a parser; its message says what is accepted."""


@dataclass(frozen=True, slots=True)
class Address:
    """A `host:port` pair."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# ---- parsers: str -> value, raising Invalid("what is accepted") ------------------------------

def parse_bool(raw: str) -> bool:
    """`true/false`, `1/0`, `yes/no`, `on/off`, any case."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Invalid("accepted: true or false (also 1/0, yes/no, on/off)")


def parse_text(raw: str) -> str:
    """Any non-empty text."""
    value = raw.strip()
    if not value:
        raise Invalid("accepted: a non-empty value")
    return value


def _number(raw: str, kind: type[int] | type[float], low: float, high: float) -> Any:
    try:
        value = kind(raw.strip())
    except ValueError:
        raise Invalid(f"accepted: {'an integer' if kind is int else 'a number'} "
                      f"from {low:g} to {high:g}") from None
    if not low <= value <= high or value != value:  # noqa: PLR0124 - NaN check
        raise Invalid(f"accepted: {'an integer' if kind is int else 'a number'} from {low:g} to {high:g}")
    return value


def number(low: float, high: float) -> Callable[[str], float]:
    """A float parser bounded to [low, high]."""
    def parse(raw: str) -> float:
        return float(_number(raw, float, low, high))
    parse.__doc__ = f"a number from {low:g} to {high:g}"
    return parse


def integer(low: int, high: int) -> Callable[[str], int]:
    """An int parser bounded to [low, high]."""
    def parse(raw: str) -> int:
        return int(_number(raw, int, low, high))
    parse.__doc__ = f"an integer from {low} to {high}"
    return parse


def choice(*options: str) -> Callable[[str], str]:
    """One of a fixed set of words, any case."""
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise Invalid(f"accepted: {', '.join(options)}")
        return value
    parse.__doc__ = " | ".join(options)
    return parse


def parse_resource(raw: str) -> Resource:
    """endpoint | training | transform | processing."""
    return Resource(choice(*(r.value for r in Resource))(raw))


def parse_interval(raw: str) -> int:
    """CloudWatch periods: 1, 5, 10, 30 or a multiple of 60 (up to 3600)."""
    accepted = "accepted: 1, 5, 10, 30 or a multiple of 60 up to 3600 (seconds)"
    try:
        value = int(raw.strip())
    except ValueError:
        raise Invalid(accepted) from None
    if value in (1, 5, 10, 30) or (value % 60 == 0 and 60 <= value <= 3600):
        return value
    raise Invalid(accepted)


def parse_address(raw: str, *, allow_auto: bool = False) -> Address | None:
    """`host:port`, `:port` (127.0.0.1), or `off`."""
    value = raw.strip()
    accepted = "accepted: host:port, :port or off" + (" or auto" if allow_auto else "")
    if value.lower() in ("off", "false", "no", "0", "none"):
        return None
    if allow_auto and value.lower() == "auto":
        return Address("auto", 0)
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Invalid(accepted)
    host = host.strip("[]") or "127.0.0.1"
    return Address(host, int(port_text))


def parse_listen(raw: str) -> Address | None:
    """`host:port`, `:port`, `auto` (SAGEMAKER_BIND_TO_PORT or 8080) or `off`."""
    return parse_address(raw, allow_auto=True)


def parse_namespace(raw: str) -> str:
    """1-255 ASCII characters of 0-9 A-Z a-z . - _ / # : space; not `AWS/...`, not `:...`."""
    value = raw.strip()
    accepted = ("accepted: 1-255 characters of 0-9 A-Z a-z . - _ / # : and space, "
                "not starting with ':' or 'AWS/' (reserved for AWS)")
    if not _NAMESPACE.fullmatch(value) or value.startswith(":") or value.upper().startswith("AWS/"):
        raise Invalid(accepted)
    return value


def parse_sagemaker_name(raw: str) -> str:
    """SageMaker's name pattern: 1-63 of letters, digits and inner hyphens."""
    value = raw.strip()
    if not _SAGEMAKER_NAME.fullmatch(value):
        raise Invalid("accepted: 1-63 letters, digits and hyphens, starting and ending "
                      "with a letter or digit")
    return value


def parse_retention(raw: str) -> int:
    """One of CloudWatch Logs' retention periods in days."""
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value not in RETENTION_DAYS:
        raise Invalid("accepted: one of " + ", ".join(map(str, RETENTION_DAYS)))
    return value


def parse_regex(raw: str) -> re.Pattern[str]:
    """A Python regular expression."""
    try:
        return re.compile(raw)
    except re.error as exc:
        raise Invalid(f"accepted: a valid regular expression ({exc})") from None


def _expand(raw: str) -> Path:
    """`~` and `~user` expanded; an unknown user leaves the path as written."""
    try:
        return Path(raw).expanduser()
    except RuntimeError:  # "~nobody-such": Path cannot find that home directory
        return Path(raw)


def parse_absolute_path(raw: str) -> Path:
    """An absolute filesystem path."""
    path = _expand(raw.strip())
    if not raw.strip() or not path.is_absolute():
        raise Invalid("accepted: an absolute path")
    return path


def parse_socket_path(raw: str) -> Path:
    """An absolute path short enough for a Unix socket (107 bytes)."""
    path = parse_absolute_path(raw)
    if len(str(path).encode()) > 107:
        raise Invalid("accepted: an absolute path of at most 107 bytes (Unix socket limit)")
    return path


def parse_host(raw: str) -> str:
    """1-255 characters without whitespace, ':' or '*' (it goes into stream names)."""
    value = raw.strip()
    if not value or len(value) > 255 or any(c.isspace() or c in ":*" for c in value):
        raise Invalid("accepted: 1-255 characters without whitespace, ':' or '*'")
    return value


def parse_log_group(raw: str) -> str:
    """1-512 of A-Z a-z 0-9 _ - / . # (plus {placeholders})."""
    value = raw.strip()
    if not _LOG_GROUP.fullmatch(value):
        raise Invalid("accepted: 1-512 characters of A-Z a-z 0-9 _ - / . # and {placeholders}")
    return value


def parse_log_stream(raw: str) -> str:
    """1-512 characters without ':' or '*'."""
    value = raw.strip()
    if not value or len(value) > 512 or ":" in value or "*" in value:
        raise Invalid("accepted: 1-512 characters without ':' or '*'")
    return value


def parse_log_level(raw: str) -> str:
    """debug | info | warning | error."""
    return choice("debug", "info", "warning", "error")(raw)


def parse_cloudwatch(raw: str) -> str:
    """on | off | auto."""
    value = raw.strip().lower()
    value = {"true": "on", "false": "off", "1": "on", "0": "off"}.get(value, value)
    return choice("on", "off", "auto")(value)


# ---- the table -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Field:
    """One configuration key: `TELEMETRY_<NAME>` in the environment, `<name>` in TOML."""

    name: str
    parse: Callable[[str], Any]
    default: str | None
    doc: str

    @property
    def env(self) -> str:
        return PREFIX + self.name.upper()


_SETTING = "telemetry_setting"  # the dataclass-field metadata key that marks a setting


def setting(parse: Callable[[str], T], default: str | None, doc: str) -> T:
    """Declare one setting as a field of `Settings`: its parser, its default as a user
    would write it (None: unset) and one line of meaning.

    This line is the setting's only declaration: its attribute name gives the variable
    (`TELEMETRY_<NAME>`) and the TOML key, the annotation its type (checked against the
    parser's return type), and `FIELDS`, the parsing, `check-config` and the unknown-name
    check all follow from it.
    """
    declared: T = dataclass_field(metadata={_SETTING: (parse, default, doc)})
    return declared


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The effective configuration. Build it with `load_settings`.

    To add a setting, append one `name: type = setting(parser, default, meaning)` line at
    the end of the list below (then its row in the README table and its line in
    config/telemetry.toml, which tests check).
    """

    region: str | None = None  # not a setting: found as boto3 finds it
    config_file: Path | None = None  # TELEMETRY_CONFIG, read before the settings

    enabled: bool = setting(parse_bool, "true",
        "false: run the child as a plain pass-through, nothing else")
    resource: Resource = setting(parse_resource, "endpoint",
        "endpoint, training, transform or processing")
    endpoint_name: str | None = setting(parse_sagemaker_name, None,
        "EndpointName (endpoint resource)")
    variant_name: str = setting(parse_sagemaker_name, "AllTraffic",
        "VariantName (endpoint resource)")
    container_name: str | None = setting(parse_sagemaker_name, None,
        "the pipeline container's name (ContainerHostname); adds the per-container view")
    job_name: str | None = setting(parse_sagemaker_name, None,
        "training/transform/processing job; default TRAINING_JOB_NAME")
    host: str | None = setting(parse_host, None,
        "instance identity in Host and stream names; default instance id, else hostname "
        "(training: current_host)")
    namespace: str = setting(parse_namespace, "SageMakerAgent",
        "root CloudWatch namespace; not AWS/...")
    interval: int = setting(parse_interval, "60",
        "publish interval, seconds: 1, 5, 10, 30 or a multiple of 60")
    high_resolution: bool = setting(parse_bool, "false", "publish with StorageResolution=1")
    sample_interval: float = setting(number(0.1, 3600), "1", "seconds between system/GPU samples")
    cloudwatch: str = setting(parse_cloudwatch, "auto",
        "on, off, or auto = on when an AWS region is configured")
    prometheus: Address | None = setting(parse_address, "127.0.0.1:9464",
        "host:port of the /metrics endpoint, or off")
    file_sink: Path | None = setting(parse_absolute_path, None,
        "JSON Lines file recording every AWS call made or (dry run) that would be made")
    proxy_listen: Address | None = setting(parse_listen, None,
        "request proxy front address (host:port or auto)")
    proxy_upstream: Address | None = setting(parse_address, None,
        "model server address behind the proxy")
    proxy_timeout: float = setting(number(0.1, 3600), "60",
        "seconds the model server may stay silent (between two reads of its answer) before the "
        "proxy answers 504 (nginx's proxy_read_timeout)")
    proxy_connect_timeout: float = setting(number(0.1, 3600), "5",
        "seconds to connect to the model server before the proxy answers 504")
    proxy_client_header_timeout: float = setting(number(0.1, 3600), "60",
        "seconds a client may take to send a request head before its connection is closed "
        "(nginx's client_header_timeout)")
    proxy_client_body_timeout: float = setting(number(0.1, 3600), "60",
        "seconds a client may stay silent between two reads of its request body (nginx's "
        "client_body_timeout)")
    proxy_send_timeout: float = setting(number(0.1, 3600), "60",
        "seconds a client may leave its answer unread before both connections close (nginx's "
        "send_timeout)")
    proxy_keepalive_timeout: float = setting(number(0.1, 3600), "75",
        "seconds an idle client connection stays open (nginx's keepalive_timeout)")
    proxy_metrics: bool = setting(parse_bool, "false",
        "serve Prometheus /metrics on the proxy's port: the model server's own page, then the "
        "agent's")
    hook_socket: Path | None = setting(parse_socket_path, None,
        "Unix datagram socket for hooks; default a private path")
    statsd: Address | None = setting(parse_address, "127.0.0.1:8125",
        "UDP StatsD/DogStatsD listener, or off")
    disk_path: Path | None = setting(parse_absolute_path, None,
        "filesystem measured by DiskUtilization; default /opt/ml, else /")
    log_group: str | None = setting(parse_log_group, None,
        "log group override; placeholders {endpoint} {variant} {container} {job} {host} {epoch}")
    log_stream: str | None = setting(parse_log_stream, None,
        "log stream override; same placeholders")
    log_start_pattern: re.Pattern[str] | None = setting(parse_regex, None,
        "regex: a line matching it starts a new log event, others join the previous one "
        "(default: indentation and Python tracebacks)")
    shutdown_timeout: float = setting(number(0, 3600), "20",
        "seconds to flush after the child exits")
    stop_grace: float = setting(number(0, 3600), "25",
        "seconds between forwarding SIGTERM and SIGKILL to a child that has not exited")
    instance_count: int = setting(integer(1, 100000), "1",
        "instances behind the variant (InvocationsPerInstance)")
    max_models: int = setting(integer(1, 10000), "100",
        "distinct TargetModel / InferenceComponentName values published; more fold into Other")
    buffer_mb: float = setting(number(1, 65536), "64", "memory bound for buffered telemetry, MiB")
    spool_dir: Path | None = setting(parse_absolute_path, None,
        "directory for the disk spool used during outages")
    spool_mb: float = setting(number(1, 1048576), "1024", "disk spool bound, MiB")
    aws_timeout: float = setting(number(0.1, 300), "10",
        "seconds to wait for an AWS answer before retrying (connect: at most 3 s of it)")
    log_retention_days: int | None = setting(parse_retention, None,
        "retention set on log groups the agent creates")
    fail_open: bool = setting(parse_bool, "false",
        "on a configuration error, run the child without telemetry")
    log_level: str = setting(parse_log_level, "info",
        "the agent's own log level: debug, info, warning, error")
    custom_series: int = setting(integer(0, 100000), "1000",
        "distinct custom (StatsD) series (name x dimensions) published per interval; later "
        "new ones are only counted, in CustomMetricsOverflow")
    # ^ append new settings here, one line each.

    @property
    def cloudwatch_enabled(self) -> bool:
        """`on`, or `auto` with a region configured."""
        return self.cloudwatch == "on" or (self.cloudwatch == "auto" and self.region is not None)

    def describe(self) -> dict[str, Any]:
        """The effective settings as plain values, for `check-config`. Holds no credential."""
        out: dict[str, Any] = {}
        for name in [f.name for f in FIELDS] + ["region", "config_file"]:
            value = getattr(self, name)
            if isinstance(value, re.Pattern):
                value = value.pattern
            elif isinstance(value, (Path, Address, Resource)):
                value = value.value if isinstance(value, Resource) else str(value)
            out[name] = value
        out["cloudwatch_enabled"] = self.cloudwatch_enabled
        return out


# Every setting in declaration order: drives parsing, the TOML keys, `check-config` and docs.
FIELDS: tuple[Field, ...] = tuple(Field(f.name, *f.metadata[_SETTING])
                                  for f in fields(Settings) if _SETTING in f.metadata)
# Variables the agent reads that are not settings (TELEMETRY_CONFIG names the TOML file).
OTHER_VARIABLES = (PREFIX + "CONFIG",)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """One problem per `TELEMETRY_*` variable that is no setting, naming the closest known
    name: a typo (INTERVALL for INTERVAL) must not silently run with the default."""
    names = [f.env for f in FIELDS] + list(OTHER_VARIABLES)
    known = {name.removeprefix(PREFIX): name for name in names}
    problems = []
    for name in sorted(k for k in env if k.startswith(PREFIX) and k not in names):
        # Compare what follows the prefix: the shared prefix would make every name look close.
        close = difflib.get_close_matches(name.removeprefix(PREFIX), list(known), n=1, cutoff=0.6)
        hint = f"did you mean {known[close[0]]}?" if close else "no setting has a similar name"
        problems.append(f"{name} is not a known variable; {hint} "
                        "(accepted: the names in the configuration reference)")
    return problems


def _read_toml(path: Path, problems: list[str]) -> dict[str, str]:
    """TOML keys (lower-case names without the prefix) as strings, problems appended."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"TELEMETRY_CONFIG={path}: cannot read the file ({exc.strerror})")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"TELEMETRY_CONFIG={path}: not valid TOML ({exc})")
        return {}
    known = {f.name for f in FIELDS}
    out: dict[str, str] = {}
    for key, value in data.items():
        if key not in known:
            problems.append(f"TELEMETRY_CONFIG={path}: unknown key '{key}'; accepted keys: "
                            + ", ".join(sorted(known)))
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            out[key] = str(value)
        else:
            problems.append(f"TELEMETRY_CONFIG={path}: key '{key}' must be a string, number or boolean")
    return out


def resolve_region(env: Mapping[str, str]) -> str | None:
    """The AWS region as boto3 would find it (env first, then the shared config file)."""
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        return region
    config_file = _expand(env.get("AWS_CONFIG_FILE", "~/.aws/config"))
    if not config_file.is_file():
        return None
    import botocore.session  # noqa: PLC0415 - only when a config file exists

    session = botocore.session.Session()
    found: str | None = session.get_config_variable("region")
    return found


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse the environment (then `TELEMETRY_CONFIG`'s TOML) into `Settings`.

    Args:
        env: the environment; `os.environ` when None.

    Raises:
        ConfigError: listing every invalid value, each naming its variable.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    file_values: dict[str, str] = {}
    config_file: Path | None = None
    if env.get("TELEMETRY_CONFIG"):
        config_file = _expand(env["TELEMETRY_CONFIG"])
        file_values = _read_toml(config_file, problems)

    problems.extend(unknown_variables(env))
    values: dict[str, Any] = {}
    for field in FIELDS:
        raw = env.get(field.env)
        where = field.env
        if raw is None and field.name in file_values:
            raw, where = file_values[field.name], f"{field.name} in {config_file}"
        if raw is None or (raw.strip() == "" and field.default is None):
            raw = field.default
            where = f"{field.env} (default)"
        if raw is None:
            values[field.name] = None
            continue
        try:
            values[field.name] = field.parse(raw)
        except Invalid as exc:
            problems.append(f"{where}={raw!r} is invalid; {exc}")
            values[field.name] = None

    if values.get("job_name") is None and env.get("TRAINING_JOB_NAME"):
        try:
            values["job_name"] = parse_sagemaker_name(env["TRAINING_JOB_NAME"])
        except Invalid as exc:
            problems.append(f"TRAINING_JOB_NAME={env['TRAINING_JOB_NAME']!r} is invalid; {exc}")
    region = resolve_region(env)
    _cross_checks(values, region, problems)
    if problems:
        raise ConfigError(problems)
    return Settings(**values, region=region, config_file=config_file)


def _cross_checks(values: dict[str, Any], region: str | None, problems: list[str]) -> None:
    """Rules that involve more than one key."""
    interval, sample = values.get("interval"), values.get("sample_interval")
    if interval is not None and sample is not None and sample > interval:
        problems.append(f"TELEMETRY_SAMPLE_INTERVAL={sample:g} is invalid; accepted: at most "
                        f"TELEMETRY_INTERVAL ({interval} s)")
    if values.get("proxy_listen") is not None and values.get("proxy_upstream") is None:
        problems.append("TELEMETRY_PROXY_UPSTREAM is missing; accepted: host:port of the model server "
                        "(required when TELEMETRY_PROXY_LISTEN is set)")
    cloudwatch = values.get("cloudwatch")
    sending = cloudwatch == "on" or (cloudwatch == "auto" and region is not None)
    resource = values.get("resource")
    if sending and resource is Resource.ENDPOINT and not values.get("endpoint_name"):
        problems.append("TELEMETRY_ENDPOINT_NAME is missing; accepted: the endpoint's name "
                        "(required when sending to CloudWatch for an endpoint)")
    if sending and resource not in (None, Resource.ENDPOINT) and not values.get("job_name"):
        problems.append("TELEMETRY_JOB_NAME is missing; accepted: the job's name (required when "
                        "sending to CloudWatch for a job; TRAINING_JOB_NAME is used when set)")
