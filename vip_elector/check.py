"""``vip-elector --check``: what an operator runs before ``systemctl start``.

Every line answers one question (is the configuration valid, does Consul
answer, may the token do what the daemon needs, is the check passing, what is
in the key), and nothing is changed in Consul except a throw-away session
that proves session rights and health, destroyed at once.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from .config import Settings, format_duration
from .consul import CheckNotPassing, ConsulClient, ConsulError, PermissionDenied


def run_check(settings: Settings, consul: ConsulClient, out: TextIO = sys.stdout) -> bool:
    """Print the report; True if every line is ok."""
    failures = 0

    def report(ok: bool, text: str) -> bool:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {text}", file=out)
        return ok

    def attempt(what: str, fn: Callable):
        try:
            return True, fn()
        except PermissionDenied as e:
            return report(False, f"{what}: the token from {settings.token_source} is refused: {e}"), None
        except ConsulError as e:
            return report(False, f"{what}: {e}"), None

    report(True, f"configuration {settings.config_path}: key {settings.trigger_key}, value "
                 f"{settings.value}, ttl {format_duration(settings.ttl)}, lock-delay "
                 f"{format_duration(settings.lock_delay)}, token from {settings.token_source}")
    for warning in settings.warnings:
        print(f"warn  {warning}", file=out)

    ok, key = attempt(f"Consul at {settings.address}", lambda: consul.read_key()[1])
    if not ok:
        return False
    ok, node = attempt(f"Consul at {settings.address}", consul.node_name)
    if not ok:  # it answered once, then stopped: the report ends here, no traceback (SPEC §9.1)
        return False
    report(True, f"Consul at {settings.address} answers" + (f" (agent node {node})" if node else ""))
    if key is None:
        report(True, f"trigger-key {settings.trigger_key} is free")
    elif not key.is_lock:
        report(False, f"trigger-key {settings.trigger_key} is not a lock key (flags {key.flags}); "
                      f"remove it with 'consul kv delete {settings.trigger_key}'")
    elif key.session:
        report(True, f"trigger-key {settings.trigger_key} is held by {key.value!r}")
    else:
        report(True, f"trigger-key {settings.trigger_key} is free (last value {key.value!r})")

    ok, _ = attempt(f"write right on {settings.trigger_key}", consul.can_write_key)
    if ok:
        report(True, f"the token may write {settings.trigger_key}")

    own = [settings.check_id] if settings.check_id else []
    ok, states = attempt("read health checks", lambda: consul.check_states(own))
    if ok:
        for check_id, state in states.items():
            if state is None:
                report(False, f"check '{check_id}' is not registered on the local agent")
            else:
                report(state != "critical", f"check '{check_id}' is {state}")

    def probe_session() -> None:
        session = consul.create_session(settings.checks)
        consul.destroy_session(session)

    try:
        probe_session()
        report(True, "a session bound to the checks can be created")
    except CheckNotPassing as e:
        report(False, f"a session cannot be created: {e}")
    except PermissionDenied as e:
        report(False, f"the token may not create sessions: {e}")
    except ConsulError as e:
        report(False, f"a session cannot be created: {e}")

    print("all checks passed" if not failures else f"{failures} problem(s) found", file=out)
    return not failures
