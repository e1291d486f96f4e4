"""Reload by re-execution (SPEC §8.3): same PID, the installed program, the session kept.

A reload must apply what the operator edited. vip-manager's configuration and
token files are read afresh by the new program anyway; the unit's defaults
file (``/etc/default/vip-elector``: ``VIP_ELECTOR_OPTS``, ``CONSUL_HTTP_TOKEN``…)
is read by systemd only at start, so when the unit names it in
``VIP_ELECTOR_DEFAULTS`` the reload reads it here, as systemd would, and
re-executes with its options and variables. Whatever is invalid is found
before the exec: the running program then carries on as it was.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from .config import ConfigError, parse_env_file

log = logging.getLogger("vip_elector")

#: Set by the unit (Environment=): the defaults file systemd read at start.
DEFAULTS_VAR = "VIP_ELECTOR_DEFAULTS"
#: Set for the re-executed program: it says "reloaded", not "starting".
REEXEC_VAR = "VIP_ELECTOR_REEXEC"
OPTS_VAR = "VIP_ELECTOR_OPTS"


@dataclass(frozen=True)
class Invocation:
    """A program's arguments (after the interpreter's own) and environment."""

    args: list[str]
    env: dict[str, str] = field(repr=False)


def read_defaults(path: str) -> dict[str, str]:
    """The variables of a defaults file, as systemd's EnvironmentFile= reads them."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_env_file(f.read())
    except FileNotFoundError:
        return {}  # EnvironmentFile=-… : a missing file sets nothing
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not readable by this user ({getattr(e, 'strerror', None) or e}): "
                          f"run 'chgrp vip-elector {path}; chmod 0640 {path}'.") from None


class Reloader:
    """Knows how the daemon was started, and what a reload would start instead."""

    def __init__(self, args: list[str], env: Mapping[str, str]):
        self.args = list(args)
        self.env = dict(env)
        self.defaults = self.env.get(DEFAULTS_VAR) or None
        # The names systemd took from the defaults file at start: a reload
        # that finds one removed from the file removes it from the environment.
        self._from_defaults = set(self._defaults_now()) if self.defaults else set()
        self.next: Optional[Invocation] = None

    def _defaults_now(self) -> dict[str, str]:
        try:
            return read_defaults(self.defaults) if self.defaults else {}
        except ConfigError:
            return {}

    def prepare(self, validate: Callable[[list[str], Mapping[str, str]], object]) -> Invocation:
        """The invocation a reload would run, validated by ``validate(args, env)``; ConfigError if bad."""
        args, env = list(self.args), dict(self.env)
        if self.defaults:
            values = read_defaults(self.defaults)
            for name in self._from_defaults - set(values):
                env.pop(name, None)
            env.update(values)
            # The unit runs ExecStart=… $VIP_ELECTOR_OPTS, from this file or from an
            # Environment= line (a drop-in); systemd splits it at white space.
            if OPTS_VAR in env or OPTS_VAR in self.env:
                args = env.get(OPTS_VAR, "").split()
                if not args:
                    raise ConfigError(f"{self.defaults} sets no {OPTS_VAR}: set it (the options "
                                      "vip-elector runs with), then reload again.")
        validate(args, env)
        self.next = Invocation(args, env)
        return self.next

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


__all__ = ["Reloader", "Invocation", "read_defaults", "DEFAULTS_VAR", "REEXEC_VAR"]
