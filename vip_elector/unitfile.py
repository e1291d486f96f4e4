"""What systemd runs for a unit, as systemd itself reads it (``--check-service``).

``--check-service`` must give systemd's verdict, so it reads what systemd
reads the way systemd reads it:

* ``EnvironmentFile=``: systemd's own grammar (src/basic/env-file.c): a
  backslash-newline continues a line, "..." and '...' quote (a value may
  span lines), ``#`` and ``;`` start a comment only at the start of a line;
  systemd before 254 also continues a comment that ends in a backslash;
* the unit with its drop-ins: when systemd runs, it is asked (``systemctl
  show``: the effective ``ExecStart=``, ``Environment=``, ``EnvironmentFiles=``
  and sandbox, specifiers expanded); otherwise the unit file and its
  ``.d/*.conf`` drop-ins are read from the unit search path;
* ``ExecStart=``'s ``$VAR`` (split at whitespace) and ``${VAR}`` (one word).

It also says which paths the unit's sandbox hides from the daemon.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

#: The unit search path of a system manager, highest priority first.
UNIT_PATH = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
SHOW_PROPERTIES = ("LoadState", "ExecStart", "Environment", "EnvironmentFiles", "ProtectHome",
                   "PrivateTmp", "ProtectSystem", "ReadWritePaths", "RuntimeDirectory", "User")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class UnitView:
    """The unit as systemd would run it; ``source`` says where that was learned."""

    unit: str
    source: str
    exec_start: list[str] = field(default_factory=list)        # as written: $VARS unexpanded
    environment: dict[str, str] = field(default_factory=dict)  # Environment= (drop-ins applied)
    environment_files: list[tuple[str, bool]] = field(default_factory=list)  # (path, optional)
    protect_home: str = "no"
    private_tmp: bool = False
    protect_system: str = "no"
    read_write_paths: tuple[str, ...] = ()
    runtime_directories: tuple[str, ...] = ()


# ------------------------------------------------------------ EnvironmentFile=

def parse_environment_file(text: str, comment_continues: bool = False) -> dict[str, str]:
    """NAME=value assignments as systemd's EnvironmentFile= reads them.

    ``comment_continues``: systemd before 254 (bookworm's 252) treats the line
    after a comment ending in a backslash as part of the comment.
    """
    values: dict[str, str] = {}
    key: list[str] = []
    value: list[str] = []
    state = "pre_key"
    trailing = None  # where the unquoted value's trailing whitespace starts

    def push() -> None:
        name = "".join(key).rstrip(" \t")
        if _ENV_NAME.match(name):
            text_value = "".join(value)
            values[name] = text_value[:trailing] if state == "value" and trailing is not None else text_value

    for c in text:
        if state == "pre_key":
            if c in "#;":
                state = "comment"
            elif c not in " \t\n\r":
                state, key, value, trailing = "key", [c], [], None
        elif state == "key":
            if c in "\n\r":
                state = "pre_key"  # a line without "=" is ignored
            elif c == "=":
                state = "pre_value"
            else:
                key.append(c)
        elif state == "pre_value":
            if c in "\n\r":
                push()
                state = "pre_key"
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "value_escape"
            elif c not in " \t":
                state, trailing = "value", None
                value.append(c)
        elif state == "value":
            if c in "\n\r":
                push()
                state = "pre_key"
            elif c == "\\":
                state, trailing = "value_escape", None
            else:
                if c not in " \t":
                    trailing = None
                elif trailing is None:
                    trailing = len(value)
                value.append(c)
        elif state == "value_escape":
            state = "value"
            if c not in "\n\r":  # a backslash-newline continues the line
                value.append(c)
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value.append(c)
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value.append(c)
        elif state == "double_escape":
            state = "double"
            if c in '"\\`$':
                value.append(c)
            elif c != "\n":
                value.extend(("\\", c))
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c in "\n\r":
                state = "pre_key"
        elif state == "comment_escape":
            state = "comment" if comment_continues or c not in "\n\r" else "pre_key"
    if state in ("pre_value", "value", "value_escape", "single", "double", "double_escape"):
        push()
    return values


# ------------------------------------------------------------- ExecStart=

def expand_exec(argv: Sequence[str], env: dict[str, str]) -> list[str]:
    """ExecStart='s words with $VAR split at whitespace and ${VAR} kept one word."""
    out: list[str] = []
    for word in argv:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            out.extend(env.get(whole.group(1), "").split())
            continue
        out.append(re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                          lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""), word))
    return out


def daemon_options(view: UnitView, env: dict[str, str]) -> Optional[list[str]]:
    """The options ExecStart= gives vip-elector, expanded; None if it does not run vip-elector."""
    argv = expand_exec(view.exec_start, env)
    for i, word in enumerate(argv):
        if os.path.basename(word.lstrip("-@:+!")) == "vip-elector":
            return argv[i + 1:]
    return None


# ------------------------------------------------------- from systemd itself

def systemd_runs() -> bool:
    """sd_booted(): is systemd the service manager here?"""
    return os.path.isdir("/run/systemd/system")


def systemd_version(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Optional[int]:
    try:
        res = run(["systemctl", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"systemd (\d+)", res.stdout or "")
    return int(m.group(1)) if m else None


def parse_show(unit: str, text: str) -> Optional[UnitView]:
    """The view of ``systemctl show -p ...`` output; None when systemd has no such unit."""
    props: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            props.setdefault(name, []).append(value)

    def one(name: str, default: str = "") -> str:
        return (props.get(name) or [default])[-1]

    if one("LoadState") != "loaded":
        return None
    view = UnitView(unit=unit, source="systemd (systemctl show)")
    m = re.search(r"argv\[\]=(.*?) ; ", one("ExecStart"))
    view.exec_start = m.group(1).split() if m else []
    try:
        words = shlex.split(one("Environment"))
    except ValueError:
        words = one("Environment").split()
    view.environment = dict(w.split("=", 1) for w in words if "=" in w)
    for entry in props.get("EnvironmentFiles", []):
        m = re.fullmatch(r"(.*) \(ignore_errors=(yes|no)\)", entry)
        if m:
            view.environment_files.append((m.group(1), m.group(2) == "yes"))
        elif entry:
            view.environment_files.append((entry, False))
    view.protect_home = one("ProtectHome", "no")
    view.private_tmp = one("PrivateTmp", "no") == "yes"
    view.protect_system = one("ProtectSystem", "no")
    view.read_write_paths = tuple(p.lstrip("-+") for p in one("ReadWritePaths").split())
    view.runtime_directories = tuple(one("RuntimeDirectory").split())
    return view


def from_systemd(unit: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Optional[UnitView]:
    """Ask the running systemd; None when it cannot say (not loaded, no systemctl)."""
    try:
        res = run(["systemctl", "show", unit, "-p", ",".join(SHOW_PROPERTIES)],
                  capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return parse_show(unit, res.stdout)


# ------------------------------------------------------- from the unit files

def unit_files(unit: str, roots: Sequence[str] = UNIT_PATH) -> list[str]:
    """The unit's file and its drop-ins, in the order systemd applies them.

    The first file found on the path (an instance's own, else its template's),
    then every ``*.conf`` of ``service.d/``, the template's and the unit's
    ``.d`` directories, by file name (a name in a higher-priority directory
    masks the same name in a lower one).
    """
    template = re.sub(r"@[^.]*\.", "@.", unit) if "@" in unit else None
    fragment = None
    for name in ([unit, template] if template else [unit]):
        for root in roots:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                fragment = path
                break
        if fragment:
            break
    if fragment is None:
        return []
    dirs = ["service.d"] + ([template + ".d"] if template else []) + [unit + ".d"]
    dropins: dict[str, str] = {}
    for d in dirs:
        for root in reversed(roots):  # lowest priority first: higher ones replace same names
            try:
                names = os.listdir(os.path.join(root, d))
            except OSError:
                continue
            for name in names:
                if name.endswith(".conf"):
                    dropins[name] = os.path.join(root, d, name)
    return [fragment] + [dropins[n] for n in sorted(dropins)]


def _specifiers(unit: str) -> dict[str, str]:
    prefix, _, rest = unit.partition("@")
    instance = rest.rsplit(".", 1)[0] if rest else ""
    name = unit.rsplit(".", 1)[0]
    unescape = lambda s: s.replace("-", "/")  # noqa: E731 (systemd-escape's inverse, enough here)
    return {"i": instance, "I": unescape(instance), "n": unit, "N": name, "p": prefix,
            "P": unescape(prefix), "%": "%"}


def _expand(value: str, spec: dict[str, str]) -> str:
    return re.sub(r"%(.)", lambda m: spec.get(m.group(1), m.group(0)), value)


def parse_unit_texts(unit: str, texts: Sequence[str]) -> UnitView:
    """The [Service] settings of a unit file and its drop-ins, applied in order."""
    view = UnitView(unit=unit, source="the unit files (systemd is not running)")
    spec = _specifiers(unit)
    for text in texts:
        section = None
        for line in re.sub(r"\\\n", " ", text).splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
                continue
            if section != "[Service]" or "=" not in line:
                continue
            name, value = (part.strip() for part in line.split("=", 1))
            value = _expand(value, spec)
            if name == "ExecStart":
                view.exec_start = value.split() if value else []
            elif name == "Environment":
                if not value:
                    view.environment = {}
                    continue
                try:
                    words = shlex.split(value)
                except ValueError:
                    words = value.split()
                view.environment.update(w.split("=", 1) for w in words if "=" in w)
            elif name == "EnvironmentFile":
                if not value:
                    view.environment_files = []
                else:
                    view.environment_files.append((value.lstrip("-"), value.startswith("-")))
            elif name == "ProtectHome":
                view.protect_home = {"true": "yes", "1": "yes", "on": "yes", "false": "no", "0": "no",
                                     "off": "no"}.get(value, value) or "no"
            elif name == "PrivateTmp":
                view.private_tmp = value.lower() in ("yes", "true", "1", "on")
            elif name == "ProtectSystem":
                view.protect_system = {"true": "yes", "1": "yes", "false": "no", "0": "no"}.get(value, value)
            elif name == "ReadWritePaths":
                view.read_write_paths = () if not value else \
                    view.read_write_paths + tuple(p.lstrip("-+") for p in value.split())
            elif name == "RuntimeDirectory":
                view.runtime_directories = () if not value else view.runtime_directories + tuple(value.split())
    return view


def from_files(unit: str, roots: Sequence[str] = UNIT_PATH) -> Optional[UnitView]:
    paths = unit_files(unit, roots)
    if not paths:
        return None
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError):
            continue
    return parse_unit_texts(unit, texts)


# ------------------------------------------------------------------ sandbox

def _under(path: str, roots: Sequence[str]) -> Optional[str]:
    for root in roots:
        root = root.rstrip("/")
        if path == root or path.startswith(root + "/"):
            return root
    return None


def hidden_reason(path: str, view: UnitView, writable: bool = False) -> Optional[str]:
    """Why the unit's sandbox keeps the daemon from ``path`` (None: it does not).

    ProtectHome=yes or tmpfs hides /home, /root and /run/user (read-only
    leaves them readable, not writable); PrivateTmp=yes gives the service
    its own empty /tmp and /var/tmp; ProtectSystem=strict makes everything
    read-only but the unit's runtime directories and ReadWritePaths=.
    """
    path = os.path.normpath(path) if path.startswith("/") else path
    if not path.startswith("/"):
        return None
    home = _under(path, ("/home", "/root", "/run/user"))
    if home and (view.protect_home in ("yes", "tmpfs") or (writable and view.protect_home == "read-only")):
        return f"ProtectHome={view.protect_home} in {view.unit} hides {home}" + \
            (" from it" if view.protect_home != "read-only" else " read-only")
    tmp = _under(path, ("/tmp", "/var/tmp"))
    if tmp and view.private_tmp:
        return f"PrivateTmp=yes in {view.unit} gives it its own empty {tmp}"
    if writable and view.protect_system == "strict":
        allowed = list(view.read_write_paths) + [f"/run/{d}" for d in view.runtime_directories] + \
            ["/dev", "/proc", "/sys"]
        if not _under(path, allowed):
            return f"ProtectSystem=strict in {view.unit} makes it read-only"
    return None
