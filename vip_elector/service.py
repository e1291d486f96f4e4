"""What the systemd units run besides the daemon.

``--service-condition[=INSTANCE]`` is the units' ``ExecCondition=``: it keeps
an unconfigured node from competing (SPEC §7). The package ships no
``VIP_ELECTOR_OPTS``; until the operator sets it, and until the vip-manager
configuration it names exists, the unit is skipped (not failed) and
``systemctl status`` shows one line saying what to set and where.

``--check-service[=INSTANCE]`` is the one command that checks exactly what the
service will run: run as root, it takes the unit as systemd runs it (its
drop-ins applied, its defaults file read with systemd's grammar: unitfile.py),
names a path the unit's sandbox hides from the daemon, applies the start
condition, switches to the service's user as systemd does and runs
``--check`` with that environment and those options.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from typing import TYPE_CHECKING, Optional, Sequence, TextIO

if TYPE_CHECKING:
    from .unitfile import UnitView

SERVICE_USER = "vip-elector"
CONDITION_FLAG = "--service-condition"
EXAMPLE_OPTS = '"--vip-manager-config=/etc/vip-manager.yml --check-id=vip-haproxy"'
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


def option_values(args: Sequence[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (``--flag=V`` or ``--flag V``) in the options."""
    found = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            found.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            found.append(args[i + 1])
    return found


#: The paths the daemon opens, what it does with them, and where they belong.
_PATH_OPTIONS = (("--vip-manager-config", "read", "e.g. /etc/vip-manager.yml"),
                 ("--token-file", "read", "e.g. /etc/vip-elector/token"),
                 ("--hook", "run", "e.g. /usr/local/sbin/"),
                 ("--state-dir", "write", "leave it out: the default is the unit's own runtime "
                                          "directory, or add ReadWritePaths= in a drop-in"))
_PATH_VARIABLES = ("CONSUL_HTTP_TOKEN_FILE", "CONSUL_CACERT", "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY")


def sandbox_problems(opts: Sequence[str], env: dict[str, str], view: "UnitView") -> list[str]:
    """One sentence for each path the daemon needs but the unit's sandbox hides."""
    from .unitfile import hidden_reason
    problems = []
    given = [(flag, path, use, where) for flag, use, where in _PATH_OPTIONS
             for path in option_values(opts, flag)]
    given += [(name, env[name], "read", "e.g. under /etc/vip-elector/") for name in _PATH_VARIABLES
              if env.get(name)]
    for what, path, use, where in given:
        reason = hidden_reason(path, view, writable=use == "write")
        if reason:
            fix = where if where.startswith("leave") else f"move it, {where}"
            problems.append(f"{what} {path}: {reason}, so the service cannot {use} it; {fix}")
    return problems


class ServiceError(Exception):
    """What keeps systemd from running the unit as configured, in one sentence."""


def service_command(view: "UnitView", comment_continues: bool = False) -> tuple[dict[str, str], list[str]]:
    """(environment, vip-elector's options) the unit's ExecStart= gets, as systemd computes them:
    Environment= first, then each EnvironmentFile=, which override it, then $VAR expanded."""
    from . import unitfile
    env = dict(view.environment)
    for path, optional in view.environment_files:
        try:
            with open(path, encoding="utf-8") as f:
                env.update(unitfile.parse_environment_file(f.read(), comment_continues))
        except FileNotFoundError:
            if not optional:
                raise ServiceError(f"{path} (EnvironmentFile= of {view.unit}) does not exist, so "
                                   f"systemd would not start {view.unit}: create it, or make it "
                                   "optional (EnvironmentFile=-PATH)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ServiceError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    opts = unitfile.daemon_options(view, env)
    if opts is None:
        raise ServiceError(f"ExecStart= of {view.unit} ({' '.join(view.exec_start) or 'none'}) does not "
                           f"run vip-elector: remove the drop-in that changes it (systemctl cat "
                           f"{view.unit} shows them)")
    return env, opts


def effective_unit(unit: str) -> Optional["UnitView"]:
    """The unit as systemd runs it: asked from systemd when it runs, else read from the files."""
    from . import unitfile
    view = unitfile.from_systemd(unit) if unitfile.systemd_runs() else None
    return view or unitfile.from_files(unit)


def check_service_main(instance: Optional[str], out: Optional[TextIO] = None) -> int:
    """Check what the unit runs: its options and environment (drop-ins applied), its
    sandbox, its start condition and, as its user, ``--check``."""
    from . import unitfile
    out = out or sys.stdout
    defaults, unit = defaults_file(instance), unit_name(instance)
    service = unit + ".service"

    def fail(text: str) -> int:
        print(f"FAIL  {text}", file=out)
        print("1 problem(s) found", file=out, flush=True)
        return 1

    if os.geteuid() != 0:
        return fail(f"run 'vip-elector --check-service' as root: it reads {defaults} (0640 "
                    f"root:{SERVICE_USER}) and switches to the {SERVICE_USER} user, as systemd does")
    view = effective_unit(service)
    if view is None:
        return fail(f"{service} is not installed (no unit file in {', '.join(unitfile.UNIT_PATH)}): "
                    "reinstall the package")
    try:
        env, opts = service_command(view, (unitfile.systemd_version() or 999) < 254)
    except ServiceError as e:
        return fail(str(e))
    verdict = condition_verdict(opts, instance)
    if verdict is not None:
        return fail(f"{service} would be skipped: {verdict}")
    try:
        user = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return fail(f"the user {SERVICE_USER} does not exist: reinstall the package (its postinst "
                    "creates it)")
    files = ", ".join(p for p, _ in view.environment_files) or "no file"
    print(f"ok    {service} runs: vip-elector {' '.join(_masked(opts))} (user {SERVICE_USER}, "
          f"environment from {files}; as told by {view.source})", file=out)
    problems = sandbox_problems(opts, env, view)
    for text in problems:
        print(f"FAIL  {text}", file=out)
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
    lines = res.stdout.splitlines()
    if not problems or not lines or not (lines[-1] == "all checks passed" or
                                         lines[-1].endswith(" problem(s) found")):
        print(res.stdout, end="", file=out, flush=True)
        return res.returncode if not problems else 1
    # One summary for the sandbox's problems and the check's.
    body = lines[:-1]
    total = len(problems) + sum(line.startswith("FAIL") for line in body)
    print("\n".join(body + [f"{total} problem(s) found"]), file=out, flush=True)
    return 1



def service_options(instance: Optional[str] = None,
                    path: Optional[str] = None) -> tuple[list[str], dict[str, str]]:
    """The service's options and environment (VIP_ELECTOR_OPTS and the rest of its defaults
    file), for ``list`` and ``switchover`` run without --vip-manager-config: the operator's
    commands then use exactly the service's key, Consul and token."""
    from . import unitfile
    from .config import ConfigError
    defaults = path or defaults_file(instance)
    try:
        with open(defaults, encoding="utf-8") as f:
            env = unitfile.parse_environment_file(f.read())  # as systemd reads it
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
