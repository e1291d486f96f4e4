"""Reload by re-execution (SPEC §8.3): same PID, the installed program, the session kept.

A reload must apply what the operator edited. vip-manager's configuration and
token files are read afresh by the new program anyway. The unit's own
settings — ``VIP_ELECTOR_OPTS`` and the variables of ``/etc/default/vip-elector``
or of a drop-in — systemd computes for every command it runs, the
``ExecReload=`` command included, but gives the main process only at start.
So the unit reloads with ``vip-elector --reload-pid $MAINPID``: that command,
run by systemd with the fresh environment, leaves it in the runtime
directory and sends SIGHUP; the daemon takes it, validates it, and
re-executes itself with those options and that environment. Whatever is
invalid is found before the exec: the running program then carries on.

A plain ``kill -HUP`` (no environment left) re-executes with the options and
environment the daemon has.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, TextIO, TypeVar

from .config import ConfigError

log = logging.getLogger("vip_elector")
T = TypeVar("T")

#: Set for the re-executed program: it says "reloaded", not "starting".
REEXEC_VAR = "VIP_ELECTOR_REEXEC"
OPTS_VAR = "VIP_ELECTOR_OPTS"
#: In $RUNTIME_DIRECTORY: the environment the unit's ExecReload= was given.
RELOAD_FILE = "reload-environment.json"
#: In $RUNTIME_DIRECTORY: the daemon's verdict on that reload ("" applied, else why not).
VERDICT_FILE = "reload-verdict"
#: What systemd sets for the main process itself, or differently for ExecReload=.
MAIN_PROCESS_ONLY = frozenset({
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "LISTEN_FDS", "LISTEN_PID",
    "LISTEN_FDNAMES", "MAINPID", "SYSTEMD_EXEC_PID", "MANAGERPID", "INVOCATION_ID"})
#: How long --reload-pid waits for the daemon's verdict: a turn of its loop
#: (6 s at most) and the reload's own requests (6 s) fit well inside.
RELOAD_WAIT = 30.0


@dataclass(frozen=True)
class Invocation:
    """A program's arguments (after the interpreter's own) and environment."""

    args: list[str]
    env: dict[str, str] = field(repr=False)


def _reload_file(env: Mapping[str, str], name: str = RELOAD_FILE) -> Optional[str]:
    runtime = (env.get("RUNTIME_DIRECTORY") or "").split(":")[0]
    return os.path.join(runtime, name) if runtime else None


def request_reload(pid: int, env: Mapping[str, str] = os.environ, out: TextIO = sys.stderr) -> int:
    """The unit's ExecReload=: hand the fresh environment to the daemon, then SIGHUP it.

    Returns 0 once the daemon has applied it (it has sent RELOADING=1 by
    then, so systemd waits for its READY=1), or 1 saying why not — a
    configuration the daemon refused included, so that `systemctl reload`
    fails and configuration management notices.
    """
    path = _reload_file(env)
    verdict = _reload_file(env, VERDICT_FILE)
    if verdict is not None:
        _unlink(verdict)
    if path is not None:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".reload-", dir=os.path.dirname(path))
            with os.fdopen(fd, "w") as f:
                json.dump(dict(env), f)
            os.replace(tmp, path)
        except OSError as e:
            print(f"vip-elector: cannot hand the new environment to the daemon in {path} "
                  f"({e.strerror or e}); it reloads with the one it has", file=out)
            path = None
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        print(f"vip-elector: cannot signal the daemon (PID {pid}): {e.strerror or e}", file=out)
        return 1
    if path is None or verdict is None:
        return 0
    deadline = time.monotonic() + RELOAD_WAIT
    while not os.path.exists(verdict):
        if time.monotonic() > deadline:
            _unlink(path)
            print(f"vip-elector: the daemon (PID {pid}) did not answer the reload within "
                  f"{RELOAD_WAIT:g}s; see journalctl -u vip-elector", file=out)
            return 1
        time.sleep(0.01)
    try:
        with open(verdict, encoding="utf-8") as f:
            why = f.read().strip()
    except OSError:
        why = ""
    _unlink(verdict)
    if why:
        print(f"vip-elector: reload refused, the daemon keeps running with its previous "
              f"configuration: {why}", file=out)
        return 1
    return 0


def take_reload_environment(env: Mapping[str, str]) -> Optional[dict[str, str]]:
    """The environment the unit's ExecReload= left for us, or None; the file is removed."""
    path = _reload_file(env)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring the reload's environment in %s (%s)", path, e)
        data = None
    finally:
        _unlink(path)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return None
    return data


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Reloader:
    """Knows how the daemon was started, and what a reload would start instead."""

    def __init__(self, args: list[str], env: Mapping[str, str]):
        self.args = list(args)
        self.env = dict(env)
        self.next: Optional[Invocation] = None
        self._asked_by_unit = False  # the unit's ExecReload= waits for our verdict

    def prepare(self, validate: Callable[[list[str], Mapping[str, str]], T]) -> T:
        """Validate the invocation a reload would run: what ``validate(args, env)`` returns
        (the new program's settings), or its ConfigError; the exec then runs that invocation."""
        args, env = list(self.args), dict(self.env)
        fresh = take_reload_environment(self.env)
        self._asked_by_unit = fresh is not None
        if fresh is not None:
            # The unit's settings from the fresh environment; what systemd gives the
            # main process alone (its watchdog, its journal stream…) from ours.
            env = {k: v for k, v in fresh.items() if k not in MAIN_PROCESS_ONLY}
            env.update({k: v for k, v in self.env.items() if k in MAIN_PROCESS_ONLY})
            # systemd splits an unquoted $VIP_ELECTOR_OPTS in ExecStart= at white space.
            args = env.get(OPTS_VAR, "").split()
            if not args:
                raise ConfigError(f"{OPTS_VAR} is not set (in /etc/default/vip-elector or a drop-in): "
                                  "set the options vip-elector runs with, then reload again.")
        validated = validate(args, env)
        self.next = Invocation(args, env)
        return validated

    def verdict(self, error: Optional[str]) -> None:
        """Tell the unit's ExecReload= (if it asked) whether the reload applies: None, or why not."""
        path = _reload_file(self.env, VERDICT_FILE)
        if not self._asked_by_unit or path is None:
            return
        self._asked_by_unit = False
        try:
            fd, tmp = tempfile.mkstemp(prefix=".verdict-", dir=os.path.dirname(path))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(error or "")
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot tell the reload command the outcome in %s (%s)", path, e.strerror or e)

    def exec(self, extra_env: Mapping[str, str]) -> None:
        """Replace this program; returns only if the exec failed (OSError)."""
        invocation = self.next or Invocation(self.args, self.env)
        env = dict(invocation.env)
        env.update(extra_env)
        env[REEXEC_VAR] = "1"
        orig = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
        # What came before the program's own arguments: python3 /usr/bin/vip-elector,
        # or python3 -m vip_elector.
        prefix = orig[:len(orig) - (len(sys.argv) - 1)] if len(sys.argv) > 1 else orig
        argv = [sys.executable] + prefix[1:] + invocation.args
        logging.shutdown()
        os.execve(sys.executable, argv, env)


__all__ = ["Reloader", "Invocation", "request_reload", "take_reload_environment", "REEXEC_VAR"]
