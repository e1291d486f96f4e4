"""Settings: the vip-manager configuration, the command line and the environment.

vip-elector reads vip-manager's own configuration so the two programs can
never disagree about the key, the value or the Consul they talk to. This
module turns that file (YAML, or the ``/etc/default/vip-manager`` environment
file), the command-line options and the ``CONSUL_*`` environment into one
validated :class:`Settings`, following the precedence rules of SPEC §3.

Every problem a user can fix raises :class:`ConfigError` with one sentence
that names the file or flag and says what to change.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

import yaml

if TYPE_CHECKING:
    from .metrics import MetricsAddress
from .address import VipSettings

DEFAULT_ADDR = "127.0.0.1:8500"
MIN_TTL, MAX_TTL = 10.0, 24 * 3600.0  # Consul refuses anything else
MAX_LOCK_DELAY = 60.0  # Consul silently caps lock-delay at 60 s


#: The check every session carries: the node's gossip health (SPEC §4.1).
SERF_HEALTH = "serfHealth"


class ConfigError(Exception):
    """A configuration problem the user can fix; the message is one sentence."""


@dataclass(frozen=True)
class TLSSettings:
    verify: object = True  # True, False, or a CA bundle path (as requests takes it)
    cert: Optional[tuple[str, str]] = None


@dataclass(frozen=True)
class Settings:
    config_path: str
    trigger_key: str
    value: str
    scheme: str
    host: str
    port: int
    token: Optional[str] = field(default=None, repr=False)
    token_source: str = "none"
    check_id: Optional[str] = None
    ttl: float = 10.0
    lock_delay: float = 1.0
    tls: TLSSettings = TLSSettings()
    #: ``--check-id`` given more than once (SPEC §11.5): the checks after the first.
    more_check_ids: tuple[str, ...] = ()
    #: SPEC §11.4: a free key goes to the highest priority present.
    priority: int = 100
    #: SPEC §11.4: take leadership from a lower priority after passing this long; None: never.
    preempt_delay: Optional[float] = None
    #: Where the session's ID is kept for resuming (SPEC §8.1); None: nothing is kept.
    state_dir: Optional[str] = None
    #: Leadership hook (SPEC §10): run as ``HOOK STATE KEY VALUE``.
    hook: Optional[str] = None
    hook_timeout: float = 10.0
    #: Where Prometheus metrics are served (SPEC §11.6); None: not at all. Set by cli.py.
    metrics_address: Optional["MetricsAddress"] = None
    #: Warnings to log once logging is up (e.g. the hostname mismatch).
    warnings: tuple[str, ...] = ()
    #: The VIP this node holds while it leads (--manage-vip, SPEC §12); None: vip-manager's job.
    vip: Optional[VipSettings] = None

    @property
    def address(self) -> str:
        """The Consul address as people write it, for messages."""
        prefix = "https://" if self.scheme == "https" else ""
        return f"{prefix}{self.host}:{self.port}"

    @property
    def token_words(self) -> str:
        """Which token the requests carry, as an operator says it (never the token itself)."""
        return f"the token from {self.token_source}" if self.token else "no token (anonymous)"

    @property
    def session_name(self) -> str:
        return f"vip-elector-{self.value}"

    @property
    def check_ids(self) -> tuple[str, ...]:
        """Every ``--check-id``, in the order given."""
        return ((self.check_id,) if self.check_id else ()) + self.more_check_ids

    @property
    def checks(self) -> list[str]:
        return [SERF_HEALTH] + list(self.check_ids)


# --------------------------------------------------------------------------
# Durations


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse a Go duration (``500ms``, ``1m30s``) or a bare number of seconds."""
    text = text.strip()
    if not text:
        raise ValueError("empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return total


def format_duration(seconds: float) -> str:
    """Render seconds the way Consul and people read them (``10s``, ``1.5s``)."""
    return f"{seconds:g}s"


# --------------------------------------------------------------------------
# The vip-manager configuration file


@dataclass(frozen=True)
class VipManagerConfig:
    """The part of vip-manager's configuration vip-elector uses."""

    path: str
    dcs_type: Optional[str]
    endpoints: Optional[list[str]]  # None: not given; []: given but empty
    trigger_key: Optional[str]
    trigger_value: Optional[str]
    consul_token: Optional[str]
    env_form: bool = False
    #: The VIP (vip-manager's ip, netmask, interface): used only with --manage-vip.
    ip: Optional[str] = None
    netmask: Optional[str] = None
    interface: Optional[str] = None
    #: The environment variables the settings came from (env form), for messages.
    sources: tuple[tuple[str, str], ...] = ()

    def name(self, setting: str) -> str:
        """How the user spells a setting in this file: 'trigger-key' or 'VIP_TRIGGER_KEY'."""
        if not self.env_form:
            return setting
        used = dict(self.sources).get(setting)
        if used:
            return used
        return " or ".join(_ENV_NAMES[setting])


# New names first, then the legacy names of Debian's /etc/default/vip-manager.
_ENV_NAMES = {
    "dcs-type": ("VIP_DCS_TYPE", "VIP_TYPE"),
    "dcs-endpoints": ("VIP_DCS_ENDPOINTS", "VIP_ENDPOINT"),
    "trigger-key": ("VIP_TRIGGER_KEY", "VIP_KEY"),
    "trigger-value": ("VIP_TRIGGER_VALUE", "VIP_HOST"),
    "consul-token": ("VIP_CONSUL_TOKEN",),
    "ip": ("VIP_IP",),
    "netmask": ("VIP_NETMASK", "VIP_MASK"),
    "interface": ("VIP_INTERFACE", "VIP_IFACE"),
}
_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
#: ``NAME = value``: meant as an environment line, but the shell and systemd
#: read no spaces around ``=``.
_SPACED_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(\s+=\s*|=\s+)")


def _meaningful_lines(text: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of every line that is neither blank nor a comment."""
    return [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)
            if ln.strip() and not ln.strip().startswith("#")]


def _is_env_file(text: str) -> bool:
    meaningful = _meaningful_lines(text)
    return bool(meaningful) and all(_ENV_LINE.match(ln) for _, ln in meaningful)


_YAML_KEY_LINE = re.compile(r"^(?:-\s+)?[A-Za-z0-9_.-]+\s*:(?:\s|$)")


def _looks_like_env_file(text: str) -> bool:
    """Meant as an environment file: some line is ``NAME=value`` or ``NAME = value``,
    and none is a YAML ``name: value`` line."""
    lines = [ln for _, ln in _meaningful_lines(text)]
    return (any(_ENV_LINE.match(ln) or _SPACED_ENV_LINE.match(ln) for ln in lines)
            and not any(_YAML_KEY_LINE.match(ln) for ln in lines))


def _env_file_error(path: str, text: str) -> ConfigError:
    """The first line of a would-be environment file that is not ``NAME=value``, and how to fix it."""
    for number, line in _meaningful_lines(text):
        if _ENV_LINE.match(line):
            continue
        spaced = _SPACED_ENV_LINE.match(line)
        if spaced:
            name = spaced.group(1)
            return ConfigError(f"{path} line {number}: remove the spaces around '=' in '{name} =': "
                               f"an environment file needs {name}=value, with nothing between "
                               "the name, the '=' and the value.")
        return ConfigError(f"{path} line {number} is not a NAME=value line: an environment file "
                           "holds only VIP_*=value lines and # comments (or write the whole file "
                           "as vip-manager's YAML).")
    return ConfigError(f"{path} is neither vip-manager's YAML nor its environment file.")


def _sets_nothing(path: str, text: str) -> ConfigError:
    """An empty or comments-only file: say which settings it must have, in the form it is meant in."""
    env_names = "VIP_DCS_TYPE=consul and VIP_TRIGGER_KEY=<the key vip-manager watches>"
    yaml_names = "dcs-type: consul and trigger-key: <the key vip-manager watches>"
    commented = [ln.lstrip("#").strip() for ln in text.splitlines() if ln.strip().startswith("#")]
    what = "has only comments and sets nothing" if text.strip() else "is empty"
    if any(_ENV_LINE.match(ln) or ln.startswith("VIP_") for ln in commented):
        return ConfigError(f"{path} {what}: set at least {env_names}.")
    return ConfigError(f"{path} {what}: set at least {env_names} (environment-file form), "
                       f"or {yaml_names} (YAML).")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    if " #" in value:  # a trailing comment on an unquoted value
        value = value.split(" #", 1)[0].rstrip()
    return value


def parse_env_file(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = _ENV_LINE.match(line.strip())
        if m:
            values[m.group(1)] = _unquote(m.group(2))
    return values


def _from_env_file(path: str, text: str) -> VipManagerConfig:
    env = parse_env_file(text)

    sources: dict[str, str] = {}

    def pick(name: str) -> Optional[str]:
        for var in _ENV_NAMES[name]:
            if var in env:
                sources[name] = var
                return env[var]
        return None

    endpoints = pick("dcs-endpoints")
    return VipManagerConfig(
        path=path,
        dcs_type=pick("dcs-type"),
        endpoints=None if endpoints is None else [e.strip() for e in endpoints.split(",") if e.strip()],
        trigger_key=pick("trigger-key"),
        trigger_value=pick("trigger-value"),
        consul_token=pick("consul-token"),
        ip=pick("ip"), netmask=pick("netmask"), interface=pick("interface"),
        env_form=True,
        sources=tuple(sources.items()),
    )


def _yaml_scalar(path: str, data: Mapping, name: str) -> Optional[str]:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        shape = "several values" if isinstance(value, list) else "nested settings"
        raise ConfigError(f"{path}: '{name}' must be a single value (e.g. '{name}: {_EXAMPLES[name]}'), "
                          f"not {shape}.")
    if isinstance(value, bool):
        value = "true" if value else "false"
    return str(value)


_EXAMPLES = {"dcs-type": "consul", "trigger-key": "service/pg/leader", "trigger-value": "node-a",
             "consul-token": "<token>", "ip": "10.0.0.10", "netmask": "24", "interface": "eth0"}


def _yaml_syntax_error(path: str, error: yaml.YAMLError) -> ConfigError:
    """PyYAML's own words, with the line it points at (and where the construct it was reading began)."""
    problem = getattr(error, "problem", None) or "not valid YAML"
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    started, fix = "", mark.line + 1 if mark is not None else None
    if context and context_mark is not None and (mark is None or context_mark.line != mark.line):
        started = f" ({context} that begins at line {context_mark.line + 1})"
        fix = context_mark.line + 1
    advice = f"fix line {fix}" if fix else "fix the syntax"
    return ConfigError(f"{path} is not valid YAML: {problem}{where}{started}; {advice}.")


def _shape_error(path: str, data: object) -> ConfigError:
    """A YAML document that is not a mapping, described in YAML's words, not Python's."""
    shape = "a sequence ('- item' lines)" if isinstance(data, list) else "a single value"
    return ConfigError(f"{path} holds {shape}, not vip-manager's settings: write 'name: value' "
                       "lines (YAML, e.g. 'dcs-type: consul') or VIP_*=value lines (environment file).")


def _from_yaml(path: str, text: str) -> VipManagerConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if _looks_like_env_file(text):
            raise _env_file_error(path, text) from None
        raise _yaml_syntax_error(path, e) from None
    if data is None:
        raise _sets_nothing(path, text)
    if not isinstance(data, dict):
        if _looks_like_env_file(text):
            raise _env_file_error(path, text)
        raise _shape_error(path, data)
    raw = data.get("dcs-endpoints")
    if raw is None:
        endpoints = None
    elif isinstance(raw, list):
        endpoints = [str(e).strip() for e in raw if e is not None and str(e).strip()]
    elif isinstance(raw, str):
        endpoints = [e.strip() for e in raw.split(",") if e.strip()]
    else:
        raise ConfigError(f"{path}: 'dcs-endpoints' must give Consul addresses, e.g. "
                          "dcs-endpoints: [\"http://127.0.0.1:8500\"].")
    return VipManagerConfig(
        path=path,
        dcs_type=_yaml_scalar(path, data, "dcs-type"),
        endpoints=endpoints,
        trigger_key=_yaml_scalar(path, data, "trigger-key"),
        trigger_value=_yaml_scalar(path, data, "trigger-value"),
        consul_token=_yaml_scalar(path, data, "consul-token"),
        ip=_yaml_scalar(path, data, "ip"),
        netmask=_yaml_scalar(path, data, "netmask"),
        interface=_yaml_scalar(path, data, "interface"),
    )


def unreadable_fix(path: str) -> str:
    """'is not readable by user U: ...fix' — the user this runs as (the service's, under systemd)."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        user, group = str(os.geteuid()), str(os.getegid())
    return (f"is not readable by user {user}: make it so, e.g. chgrp {group} {path}; "
            f"chmod 0640 {path}.")


def load_vip_manager_config(path: str) -> VipManagerConfig:
    """Read vip-manager's YAML file or its environment file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1024 * 1024 + 1)
    except FileNotFoundError:
        raise ConfigError(f"--vip-manager-config: {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"--vip-manager-config: {path} is a directory, not a file.") from None
    except PermissionError:
        raise ConfigError(f"--vip-manager-config: {path} {unreadable_fix(path)}") from None
    except OSError as e:
        raise ConfigError(f"--vip-manager-config: cannot read {path}: {e.strerror}.") from None
    if len(raw) > 1024 * 1024:
        raise ConfigError(f"{path} is larger than 1 MiB: is it really vip-manager's configuration?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file: give vip-manager's YAML "
                          "configuration or its environment file.") from None
    if "\x00" in text:
        raise ConfigError(f"{path} contains binary data: give vip-manager's YAML "
                          "configuration or its environment file.")
    if not _meaningful_lines(text):
        raise _sets_nothing(path, text)
    if _is_env_file(text):
        return _from_env_file(path, text)
    return _from_yaml(path, text)


# --------------------------------------------------------------------------
# Addresses, tokens, names


def parse_address(text: str, source: str) -> tuple[str, str, int]:
    """``host:port``, ``http://host:port`` or ``https://host[:port]`` → (scheme, host, port)."""
    text = text.strip().rstrip("/")
    scheme = "http"
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", text)
    if m:
        scheme = m.group(1).lower()
        text = m.group(2)
        if scheme not in ("http", "https"):
            raise ConfigError(f"{source}: unsupported scheme {scheme!r} in the Consul address; "
                              "use http:// or https://.")
    if "/" in text:
        raise ConfigError(f"{source}: a Consul address is host:port, without a path.")
    default_port = 8501 if scheme == "https" else 8500
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\](?::(\d+))?$", text) or re.match(r"^([^:\[\]]+)(?::(\d+))?$", text)
    if not m or not m.group(1):
        raise ConfigError(f"{source}: {text!r} is not a Consul address; write host:port, "
                          "e.g. 127.0.0.1:8500.")
    host = m.group(1)
    port = int(m.group(2)) if m.group(2) else default_port
    if not 0 < port < 65536:
        raise ConfigError(f"{source}: port {port} is out of range.")
    return scheme, host, port


def read_token_file(path: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        raise ConfigError(f"{source}: token file {path} does not exist.") from None
    except PermissionError:
        raise ConfigError(f"{source}: token file {path} {unreadable_fix(path)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read token file {path}: {getattr(e, 'strerror', e)}.") from None
    if not token:
        raise ConfigError(f"{source}: token file {path} is empty.")
    return token


def normalise_key(key: str) -> str:
    """Strip leading slashes as HashiCorp's Go client does, so vip-manager reads the same key."""
    return key.strip().lstrip("/")


@dataclass(frozen=True)
class Options:
    """The command-line options, as parsed (durations already in seconds)."""

    vip_manager_config: str
    check_id: Optional[str] = None
    ttl: float = 10.0
    lock_delay: float = 1.0
    addr: Optional[str] = None
    token: Optional[str] = field(default=None, repr=False)
    token_file: Optional[str] = None
    hostname: Optional[str] = None
    state_dir: Optional[str] = None
    hook: Optional[str] = None
    hook_timeout: float = 10.0
    #: --manage-vip (or VIP_ELECTOR_MANAGE_VIP=yes, what the manage-vip drop-in sets).
    manage_vip: bool = False
    more_check_ids: tuple[str, ...] = ()
    priority: int = 100
    preempt_delay: Optional[float] = None


def _choose_address(opts: Options, vm: VipManagerConfig, env: Mapping[str, str]) -> tuple[str, str, int]:
    if opts.addr:
        return parse_address(opts.addr, "--addr")
    if vm.endpoints:
        return parse_address(vm.endpoints[0], f"{vm.path}: {vm.name('dcs-endpoints')}")
    if env.get("CONSUL_HTTP_ADDR"):
        return parse_address(env["CONSUL_HTTP_ADDR"], "CONSUL_HTTP_ADDR")
    return parse_address(DEFAULT_ADDR, "default address")


def _choose_token(opts: Options, vm: VipManagerConfig, env: Mapping[str, str]) -> tuple[Optional[str], str]:
    if opts.token:
        return opts.token, "--token"
    if opts.token_file:
        return read_token_file(opts.token_file, "--token-file"), "--token-file"
    if env.get("CONSUL_HTTP_TOKEN"):
        return env["CONSUL_HTTP_TOKEN"], "CONSUL_HTTP_TOKEN"
    if env.get("CONSUL_HTTP_TOKEN_FILE"):
        return read_token_file(env["CONSUL_HTTP_TOKEN_FILE"], "CONSUL_HTTP_TOKEN_FILE"), "CONSUL_HTTP_TOKEN_FILE"
    if vm.consul_token:
        return vm.consul_token, f"{vm.path}: {vm.name('consul-token')}"
    return None, "none"


def _choose_tls(env: Mapping[str, str]) -> TLSSettings:
    verify: object = True
    if env.get("CONSUL_CACERT"):
        if not os.path.isfile(env["CONSUL_CACERT"]):
            raise ConfigError(f"CONSUL_CACERT: {env['CONSUL_CACERT']} does not exist.")
        verify = env["CONSUL_CACERT"]
    flag = env.get("CONSUL_HTTP_SSL_VERIFY", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        verify = False
    elif flag not in ("", "1", "true", "yes", "on"):
        raise ConfigError(f"CONSUL_HTTP_SSL_VERIFY: {flag!r} is not true or false.")
    cert, key = env.get("CONSUL_CLIENT_CERT"), env.get("CONSUL_CLIENT_KEY")
    if bool(cert) != bool(key):
        raise ConfigError("CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY must be set together.")
    for var, path in (("CONSUL_CLIENT_CERT", cert), ("CONSUL_CLIENT_KEY", key)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{var}: {path} does not exist.")
    return TLSSettings(verify=verify, cert=(cert, key) if cert and key else None)


def _choose_value(opts: Options, vm: VipManagerConfig, fqdn: str) -> tuple[str, list[str]]:
    if opts.hostname is not None:
        if not opts.hostname.strip():
            raise ConfigError("--hostname must not be empty.")
        return opts.hostname.strip(), []
    if vm.trigger_value is not None and vm.trigger_value.strip():
        return vm.trigger_value.strip(), []
    short = fqdn.split(".", 1)[0]
    warnings = []
    if short != fqdn:
        warnings.append(
            f"writing the short hostname {short!r} to the trigger-key, but vip-manager's default "
            f"trigger-value is the full hostname {fqdn!r}: set {vm.name('trigger-value')} in {vm.path} "
            "(or --hostname) so both programs agree, or vip-manager will never bring up the VIP.")
    return short, warnings


def _choose_state_dir(opts: Options, env: Mapping[str, str]) -> Optional[str]:
    """``--state-dir`` > systemd's ``RUNTIME_DIRECTORY`` (its first entry) > none (SPEC §8.1)."""
    if opts.state_dir is not None:
        if not opts.state_dir.strip():
            raise ConfigError("--state-dir must not be empty: give a directory, e.g. /run/vip-elector.")
        return opts.state_dir.strip()
    runtime = (env.get("RUNTIME_DIRECTORY") or "").split(":")[0].strip()
    return runtime or None


def _check_ids(opts: Options) -> list[str]:
    """Every --check-id, stripped, duplicates dropped; an empty one is an error."""
    ids: list[str] = []
    for raw in ((opts.check_id,) if opts.check_id is not None else ()) + tuple(opts.more_check_ids):
        if not raw.strip():
            raise ConfigError("--check-id must not be empty: give the ID of a check on the local Consul agent.")
        if raw.strip() not in ids and raw.strip() != SERF_HEALTH:  # every session carries serfHealth
            ids.append(raw.strip())
    return ids


def build_settings(opts: Options, env: Mapping[str, str], kernel_hostname: Optional[str] = None) -> Settings:
    """Combine options, vip-manager's file and the environment (SPEC §3)."""
    if not (MIN_TTL <= opts.ttl <= MAX_TTL):
        raise ConfigError(f"--ttl {format_duration(opts.ttl)} is out of Consul's range: use 10s to 24h.")
    if not (0 <= opts.lock_delay <= MAX_LOCK_DELAY):
        raise ConfigError(f"--lock-delay {format_duration(opts.lock_delay)} is out of range: use 0s to 60s.")
    check_ids = _check_ids(opts)
    if not (0 <= opts.priority <= 255):
        raise ConfigError(f"--priority {opts.priority} is out of range: use 0 to 255 (default 100).")
    if opts.preempt_delay is not None and opts.preempt_delay <= 0:
        raise ConfigError(f"--preempt-delay {format_duration(opts.preempt_delay)} must be positive, "
                          "e.g. 30s (leave it out for no preemption).")

    vm = load_vip_manager_config(opts.vip_manager_config)
    path = vm.path
    def example(setting: str, value: str) -> str:
        return f"{vm.name(setting).split()[0]}={value}" if vm.env_form else f"{setting}: {value}"

    if vm.dcs_type is None:
        raise ConfigError(f"{path} does not set {vm.name('dcs-type')}: add "
                          f"'{example('dcs-type', 'consul')}' (vip-manager would default to etcd).")
    if vm.dcs_type.strip().lower() != "consul":
        raise ConfigError(f"{path} sets {vm.name('dcs-type')} to {vm.dcs_type!r}: vip-elector works "
                          f"only with '{example('dcs-type', 'consul')}'.")
    if vm.endpoints is not None and not vm.endpoints:
        raise ConfigError(f"{path} sets {vm.name('dcs-endpoints')} but lists no address: give at "
                          "least one, e.g. http://127.0.0.1:8500, or remove the setting.")
    if vm.trigger_key is None or not normalise_key(vm.trigger_key):
        raise ConfigError(f"{path} does not set {vm.name('trigger-key')}: add the Consul key "
                          f"vip-manager watches, e.g. '{example('trigger-key', 'service/pg/leader')}'.")
    key = normalise_key(vm.trigger_key)
    if key.endswith("/"):
        raise ConfigError(f"{path}: {vm.name('trigger-key')} {vm.trigger_key!r} ends with '/': it must "
                          "name a key, not a folder.")

    scheme, host, port = _choose_address(opts, vm, env)
    token, token_source = _choose_token(opts, vm, env)
    tls = _choose_tls(env) if scheme == "https" else TLSSettings()
    fqdn = kernel_hostname if kernel_hostname is not None else socket.gethostname()
    value, warnings = _choose_value(opts, vm, fqdn)

    return Settings(
        config_path=path, trigger_key=key, value=value,
        scheme=scheme, host=host, port=port,
        token=token, token_source=token_source,
        check_id=check_ids[0] if check_ids else None, more_check_ids=tuple(check_ids[1:]),
        priority=opts.priority, preempt_delay=opts.preempt_delay,
        ttl=opts.ttl, lock_delay=opts.lock_delay, tls=tls,
        state_dir=_choose_state_dir(opts, env),
        hook=opts.hook, hook_timeout=opts.hook_timeout,
        warnings=tuple(warnings),
        vip=vip_settings(vm) if opts.manage_vip else None,
    )


# --------------------------------------------------------------------------
# The VIP (--manage-vip, SPEC §12.5)


def _yaml_or_env_example(vm: VipManagerConfig, setting: str) -> str:
    value = _EXAMPLES[setting]
    return f"{vm.name(setting).split()[0]}={value}" if vm.env_form else f"{setting}: {value}"


def _dotted_prefix(text: str) -> Optional[int]:
    """24 for '255.255.255.0'; None if it is not a dotted netmask."""
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen if "." in text else None
    except ValueError:
        return None


def _prefix(vm: VipManagerConfig, version: int) -> int:
    """vip-manager 1.0.1 reads netmask as a number (a prefix length); -1 or none: a host address."""
    most = 32 if version == 4 else 128
    text = (vm.netmask or "").strip()
    if not text or text == "-1":
        return most
    name = vm.name("netmask")
    try:
        prefix = int(text)
    except ValueError:
        dotted = _dotted_prefix(text)
        hint = (f"write {dotted} for {text}" if dotted is not None
                else f"e.g. '{_yaml_or_env_example(vm, 'netmask')}'")
        raise ConfigError(f"{vm.path}: {name} {text!r} is not a prefix length: vip-manager reads "
                          f"a number of bits, {hint}.") from None
    if not 1 <= prefix <= most:
        raise ConfigError(f"{vm.path}: {name} {prefix} is out of range for an IPv{version} "
                          f"address: use 1 to {most}.")
    return prefix


def vip_settings(vm: VipManagerConfig, check_interface: bool = True) -> VipSettings:
    """vip-manager's ip/netmask/interface as the VIP to manage, or ConfigError naming the setting."""
    path = vm.path
    if vm.ip is None or not vm.ip.strip():
        raise ConfigError(f"{path} does not set {vm.name('ip')}: --manage-vip needs the virtual IP, "
                          f"e.g. '{_yaml_or_env_example(vm, 'ip')}'.")
    text = vm.ip.strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{path}: {vm.name('ip')} {text!r} is not an IP address: give the address "
                          f"alone (the prefix goes in {vm.name('netmask')}), "
                          f"e.g. '{_yaml_or_env_example(vm, 'ip')}'.") from None
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        raise ConfigError(f"{path}: {vm.name('ip')} {text} cannot be a virtual IP (it is a multicast, "
                          "unspecified, loopback or link-local address).")
    prefix = _prefix(vm, ip.version)
    if vm.interface is None or not vm.interface.strip():
        raise ConfigError(f"{path} does not set {vm.name('interface')}: --manage-vip needs the "
                          f"interface the VIP goes on, e.g. '{_yaml_or_env_example(vm, 'interface')}'.")
    interface = vm.interface.strip()
    if check_interface:
        try:
            socket.if_nametoindex(interface)
        except OSError:
            names = ", ".join(name for _, name in socket.if_nameindex()) or "none"
            raise ConfigError(f"{path}: {vm.name('interface')} {interface!r} does not exist on this "
                              f"node (its interfaces: {names}).") from None
    return VipSettings(ip=str(ip), prefix=prefix, interface=interface)
