"""What the systemd units run besides the daemon.

``--service-condition[=INSTANCE]`` is the units' ``ExecCondition=``: it keeps
an unconfigured node from competing (SPEC §7). The package ships no
``VIP_ELECTOR_OPTS``; until the operator sets it, and until the vip-manager
configuration it names exists, the unit is skipped (not failed) and
``systemctl status`` shows one line saying what to set and where.

``--check-service[=INSTANCE]`` is the one command that checks exactly what the
service will run: run as root, it reads the unit's defaults file, applies the
start condition, switches to the service's user as systemd does and runs
``--check`` with that environment and those options.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from typing import Optional, Sequence, TextIO

from .config import parse_env_file

SERVICE_USER = "vip-elector"
CONDITION_FLAG = "--service-condition"
#: Where the sandboxed service cannot see files (ProtectHome=yes).
HIDDEN_FROM_SERVICE = ("/home/", "/root/", "/run/user/")
EXAMPLE_OPTS = '"--vip-manager-config=/etc/vip-manager.yml --check-id=pg-primary"'
#: systemd's exit status for ExecCondition=: 1..254 skip the unit, 255 fails it.
SKIP = 1


def defaults_file(instance: Optional[str] = None) -> str:
    """The unit's EnvironmentFile: vip-elector.service's, or vip-elector@INSTANCE.service's."""
    return f"/etc/default/vip-elector-{instance}" if instance else "/etc/default/vip-elector"


def unit_name(instance: Optional[str] = None) -> str:
    return f"vip-elector@{instance}" if instance else "vip-elector"


def config_path(args: Sequence[str]) -> Optional[str]:
    """The value of --vip-manager-config in the options, as argparse would read it (last wins)."""
    found = None
    for i, arg in enumerate(args):
        if arg.startswith("--vip-manager-config="):
            found = arg.split("=", 1)[1]
        elif arg == "--vip-manager-config" and i + 1 < len(args):
            found = args[i + 1]
    return found


def condition_verdict(opts: Sequence[str], instance: Optional[str] = None) -> Optional[str]:
    """None if the unit may start, else the one line saying what to set and where.

    Only "is it configured at all?": a configuration that exists but is wrong
    (unreadable, invalid) starts the daemon, which fails with exit 78 and
    says exactly what is wrong, instead of being skipped quietly.
    """
    defaults, unit = defaults_file(instance), unit_name(instance)
    restart = f"then: systemctl restart {unit}"
    if not opts:
        return (f"not starting: set VIP_ELECTOR_OPTS in {defaults}, e.g. VIP_ELECTOR_OPTS={EXAMPLE_OPTS}, "
                f"check it with 'vip-elector --check-service{'=' + instance if instance else ''}', {restart}")
    path = config_path(opts)
    if path is None:
        return (f"not starting: VIP_ELECTOR_OPTS in {defaults} has no --vip-manager-config=PATH; "
                f"add it, {restart}")
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return (f"not starting: {path} (--vip-manager-config in {defaults}) does not exist; "
                f"configure vip-manager, {restart}")
    except OSError:
        return None  # not ours to judge: the daemon names the file and the fix
    if size == 0:
        return (f"not starting: {path} (--vip-manager-config in {defaults}) is empty; "
                f"configure vip-manager, {restart}")
    return None


def split_condition_argv(argv: Sequence[str]) -> Optional[tuple[Optional[str], list[str]]]:
    """(instance, the daemon's options) when argv asks for the start condition, else None."""
    for i, arg in enumerate(argv):
        if arg == CONDITION_FLAG or arg.startswith(CONDITION_FLAG + "="):
            instance = arg.split("=", 1)[1] if "=" in arg else None
            return instance or None, list(argv[:i]) + list(argv[i + 1:])
    return None


def condition_main(instance: Optional[str], opts: Sequence[str], out: Optional[TextIO] = None) -> int:
    """ExecCondition=: exit 0 to start, 1 (skip, with the reason on stdout) otherwise."""
    out = out or sys.stdout
    verdict = condition_verdict(opts, instance)
    if verdict is None:
        return 0
    print(verdict, file=out, flush=True)
    return SKIP


def _module_path_env() -> dict[str, str]:
    """PYTHONPATH for the child: this very code, wherever it is installed or checked out."""
    return {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}


def _masked(opts: Sequence[str]) -> list[str]:
    """The options as shown: a --token's value is never printed."""
    shown, hide_next = [], False
    for arg in opts:
        if hide_next:
            shown.append("***")
        elif arg.startswith("--token="):
            shown.append("--token=***")
        else:
            shown.append(arg)
        hide_next = arg == "--token"
    return shown


def check_service_main(instance: Optional[str], out: Optional[TextIO] = None) -> int:
    """Check what the unit runs: its defaults file, its condition, its user, its options."""
    out = out or sys.stdout
    defaults, unit = defaults_file(instance), unit_name(instance)

    def fail(text: str) -> int:
        print(f"FAIL  {text}", file=out)
        print("1 problem(s) found", file=out, flush=True)
        return 1

    if os.geteuid() != 0:
        return fail(f"run 'vip-elector --check-service' as root: it reads {defaults} (0640 "
                    f"root:{SERVICE_USER}) and switches to the {SERVICE_USER} user, as systemd does")
    try:
        with open(defaults, encoding="utf-8") as f:
            env = parse_env_file(f.read())
    except FileNotFoundError:
        env = {}  # EnvironmentFile=-: optional; the condition below says what to set
    except (OSError, UnicodeDecodeError) as e:
        return fail(f"cannot read {defaults}: {getattr(e, 'strerror', None) or e}")
    opts = env.get("VIP_ELECTOR_OPTS", "").split()  # systemd splits $VIP_ELECTOR_OPTS at whitespace
    verdict = condition_verdict(opts, instance)
    if verdict is not None:
        return fail(f"{unit}.service would be skipped: {verdict}")
    try:
        user = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return fail(f"the user {SERVICE_USER} does not exist: reinstall the package (its postinst "
                    "creates it)")
    print(f"ok    {unit}.service runs: vip-elector {' '.join(_masked(opts))} (user {SERVICE_USER}, "
          f"environment from {defaults})", file=out)
    for value in opts + [v for k, v in env.items() if k.startswith("CONSUL_")]:
        path = value.split("=", 1)[-1]
        if path.startswith(HIDDEN_FROM_SERVICE):
            print(f"warn  {path} is hidden from the service (ProtectHome=yes in {unit}.service): "
                  "move it, e.g. to /etc/vip-elector/", file=out)
    out.flush()
    child_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    child_env.update(_module_path_env())
    child_env.update(env)
    try:
        res = subprocess.run([sys.executable, "-m", "vip_elector", *opts, "--check"], env=child_env,
                             cwd="/", user=user.pw_uid, group=user.pw_gid,
                             extra_groups=os.getgrouplist(SERVICE_USER, user.pw_gid),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    except OSError as e:
        return fail(f"cannot run the check as user {SERVICE_USER}: {e.strerror}")
    print(res.stdout, end="", file=out, flush=True)
    return res.returncode


def service_options(instance: Optional[str] = None,
                    path: Optional[str] = None) -> tuple[list[str], dict[str, str]]:
    """The service's options and environment (VIP_ELECTOR_OPTS and the rest of its defaults
    file), for ``list`` and ``switchover`` run without --vip-manager-config: the operator's
    commands then use exactly the service's key, Consul and token."""
    from .config import ConfigError
    defaults = path or defaults_file(instance)
    try:
        with open(defaults, encoding="utf-8") as f:
            env = parse_env_file(f.read())
    except FileNotFoundError:
        raise ConfigError(f"give --vip-manager-config PATH ({defaults} does not exist, so the "
                          "service's options are unknown)") from None
    except PermissionError:
        raise ConfigError(f"give --vip-manager-config PATH, or run as root or as a member of the "
                          f"{SERVICE_USER} group to use the service's options from {defaults} "
                          "(it may hold a token: mode 0640)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {defaults}: {getattr(e, 'strerror', None) or e}") from None
    opts = env.get("VIP_ELECTOR_OPTS", "").split()
    if config_path(opts) is None:
        raise ConfigError(f"give --vip-manager-config PATH (VIP_ELECTOR_OPTS in {defaults} does not "
                          "name one: the service is not configured yet)")
    return opts, {k: v for k, v in env.items() if k != "VIP_ELECTOR_OPTS"}
