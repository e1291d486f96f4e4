"""``vip-elector list`` and ``vip-elector switchover`` (SPEC §11.2, §11.3).

Both run from any node with the daemon's configuration flags and talk to
Consul only; neither takes leadership. The switchover itself is carried out
by the leader's daemon (it alone may move its lock): this command writes the
request ``<trigger-key>/switchover`` with ``cas=0`` (a second one is refused
while one is in progress), waits until the target holds the key and says it
leads, and tidies up. Every failure is one line and a non-zero exit, and
leaves the key with its holder.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import time
from typing import Optional, TextIO

from .cluster import REQUEST_GRACE_SECONDS, Candidate, Request, Tree, wall
from .config import Settings, format_duration
from .consul import ConsulClient, ConsulError, KeyState, PermissionDenied

EXIT_OK, EXIT_FAILURE = 0, 1
#: One blocking read of the wait lasts at most this: a read that hangs (a dead connection,
#: a stalled agent) costs this much of the timeout, not all of it.
WAIT_READ = 2.0
#: Writing and deleting the request: one attempt gets this long.
WRITE_LIMIT = 3.0


class OperationFailed(Exception):
    """One line for the operator; the command exits non-zero."""


def _read(consul: ConsulClient, settings: Settings, index: Optional[int] = None,
          wait: Optional[float] = None) -> tuple[int, Optional[KeyState], Tree]:
    try:
        new_index, key, entries = consul.read_tree(index, wait)
    except PermissionDenied as e:
        raise OperationFailed(f"Consul at {settings.address} refused {settings.token_words} reading "
                              f"{settings.trigger_key}: {e}; the token needs key read on it and "
                              f"key_prefix read on {settings.trigger_key}/ (see "
                              "examples/consul-acl-policy.hcl)") from None
    except ConsulError as e:
        raise OperationFailed(f"cannot read {settings.trigger_key} from Consul at {settings.address}: "
                              f"{e}") from None
    return new_index, key, Tree.build(settings.trigger_key, entries)


def _holder(key: Optional[KeyState]) -> Optional[str]:
    return key.value if key is not None and key.session else None


def _names(tree: Tree, key: Optional[KeyState]) -> str:
    if not tree.candidates:
        return "none"
    return ", ".join(f"{c.name} ({'leader' if key and c.session == key.session else 'standby'})"
                     for c in sorted(tree.candidates.values(), key=lambda c: c.name))


def _ago(when: float, now: float) -> str:
    if not when:
        return "?"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    seconds = max(0, int(now - when))
    if seconds < 120:
        age = f"{seconds}s"
    elif seconds < 7200:
        age = f"{seconds // 60}m"
    elif seconds < 172800:
        age = f"{seconds // 3600}h"
    else:
        age = f"{seconds // 86400}d"
    return f"{stamp} ({age} ago)"


def _live_checks(consul: ConsulClient, c: Candidate) -> dict:
    """Each check's status now, from the catalog; the candidate key's copy when the token
    may not read that node (the checks passed when it was written, or the session would be gone)."""
    if not c.node:
        return dict(c.checks)
    try:
        catalog = consul.catalog_checks(c.node)
    except ConsulError:
        catalog = {}
    return {cid: catalog.get(cid, status) for cid, status in c.checks.items()}


# ---------------------------------------------------------------------------- list

def list_main(settings: Settings, consul: ConsulClient, as_json: bool, out: TextIO = sys.stdout) -> int:
    try:
        _, key, tree = _read(consul, settings)
    except OperationFailed as e:
        print(f"vip-elector list: {e}", file=sys.stderr)
        return EXIT_FAILURE
    now = wall()
    rows = []
    for c in sorted(tree.candidates.values(), key=lambda c: (-c.priority, c.name)):
        role = "leader" if key is not None and key.session and c.session == key.session else "standby"
        rows.append((c, role, _live_checks(consul, c)))
    req = tree.request
    if as_json:
        data = {
            "key": settings.trigger_key,
            "holder": _holder(key),
            "holder_session": key.session if key is not None and key.session else None,
            "candidates": [{"name": c.name, "node": c.node, "role": role, "priority": c.priority,
                            "session": c.session, "since": c.since, "up_since": c.up_since,
                            "checks": checks, "pid": c.pid, "version": c.version}
                           for c, role, checks in rows],
            "switchover": None if req is None else {
                "target": req.target, "source": req.source, "by": req.by, "requested": req.requested,
                "timeout": req.timeout, "error": req.error or None},
        }
        print(json.dumps(data, indent=2, sort_keys=False), file=out)
        return EXIT_OK
    holder = _holder(key)
    if holder is None:
        print(f"{settings.trigger_key}: free (nobody holds it)", file=out)
    elif tree.by_session(key.session) is None:
        print(f"{settings.trigger_key}: held by {holder} (session {key.session}), which is not a "
              "listed candidate (an older vip-elector, or another program)", file=out)
    else:
        print(f"{settings.trigger_key}: held by {holder}", file=out)
    if not rows:
        print("no candidates (no vip-elector of this version runs for this key)", file=out)
    else:
        table = [("NAME", "NODE", "ROLE", "PRIORITY", "SINCE", "CHECKS")]
        for c, role, checks in rows:
            table.append((c.name, c.node or "?", role, str(c.priority), _ago(c.since, now),
                          ", ".join(f"{k}={v}" for k, v in checks.items()) or "-"))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
        for r in table:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1], file=out)
    if req is not None:
        state = f"refused: {req.error}" if req.error else "in progress"
        print(f"switchover to {req.target} ({req.by or 'unknown'}, {_ago(req.requested, now)}): {state}",
              file=out)
    return EXIT_OK


# ---------------------------------------------------------------------------- switchover

def _choose_target(to: Optional[str], key: KeyState, tree: Tree, settings: Settings) -> Candidate:
    holder = key.value
    others = [c for c in tree.candidates.values() if c.session != key.session]
    if to is not None:
        target = tree.candidates.get(to)
        if target is None:
            raise OperationFailed(f"{to} is not a live candidate for {settings.trigger_key} "
                                  f"(candidates: {_names(tree, key)})")
        return target
    if not others:
        raise OperationFailed(f"no other candidate for {settings.trigger_key}: only {holder} runs "
                              f"vip-elector for it (candidates: {_names(tree, key)})")
    return sorted(others, key=lambda c: (-c.priority, c.name))[0]


def _stale(req: Request, now: float) -> bool:
    return now > req.requested + max(0.0, req.timeout) + REQUEST_GRACE_SECONDS


def switchover_main(settings: Settings, consul: ConsulClient, to: Optional[str], timeout: float,
                    out: TextIO = sys.stdout) -> int:
    try:
        return _switchover(settings, consul, to, timeout, out)
    except OperationFailed as e:
        print(f"vip-elector switchover: {e}", file=sys.stderr)
        return EXIT_FAILURE


def _switchover(settings: Settings, consul: ConsulClient, to: Optional[str], timeout: float,
                out: TextIO) -> int:
    k = settings.trigger_key
    started = time.monotonic()
    _, key, tree = _read(consul, settings)
    if _holder(key) is None:
        raise OperationFailed(f"nobody holds {k}: there is no leader to switch over from "
                              f"(candidates: {_names(tree, key)})")
    if to is not None and to == key.value:
        print(f"{to} already holds {k}: nothing to do", file=out)
        return EXIT_OK
    source = tree.by_session(key.session)
    if source is None:
        raise OperationFailed(f"{key.value} holds {k} but is not a listed candidate (an older "
                              f"vip-elector, or another program): it cannot hand over "
                              f"(candidates: {_names(tree, key)})")
    target = _choose_target(to, key, tree, settings)
    if tree.request is not None:
        req = tree.request
        if not _stale(req, wall()) and not req.error:
            raise OperationFailed(f"a switchover to {req.target} is already in progress ({req.by or 'unknown'}"
                                  f", {format_duration(round(req.requested + req.timeout - wall()))} "
                                  f"left): wait for it to finish, or try again once it expires "
                                  f"(candidates: {_names(tree, key)})")
        _delete(consul, req.modify_index)  # refused or stale: its author gave up
    by = f"{getpass.getuser()}@{socket.gethostname()} (pid {os.getpid()})"  # tells our request from another's
    request = Request(target=target.name, source=key.value, timeout=timeout, requested=wall(), by=by)
    created = _put_request(consul, settings, request, key)
    if not created:
        raise OperationFailed(f"a switchover is already in progress for {k} (another request appeared "
                              f"just now): wait for it to finish (candidates: {_names(tree, key)})")
    print(f"switchover: asked {key.value} to hand {k} over to {target.name} "
          f"(waiting up to {format_duration(timeout)})", file=out, flush=True)
    deadline = started + timeout
    index = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        wait = min(left, WAIT_READ)
        try:
            with consul.time_limit(wait + 1.0):
                index, key, tree = _read(consul, settings, index or None, wait)
        except OperationFailed:  # a read that failed or hung: read afresh (Consul decides, not us)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
            index = 0
            continue
        req = tree.request
        mine = req is not None and req.target == target.name and req.by == by
        if _leads(key, tree, target.name):
            took = time.monotonic() - started
            if mine:
                _delete(consul, req.modify_index)  # the old leader deletes it too: either is enough
            print(f"switched over: {target.name} holds {k} (took {took:.3f}s)", file=out)
            return EXIT_OK
        if mine and req.error:
            _delete(consul, req.modify_index)
            raise OperationFailed(f"{key.value if key else 'the leader'} refused: {req.error}")
    # Out of time: withdraw the request, so the leader does not act on it later.
    index, key, tree = _read_at_the_end(consul, settings, target.name, timeout)
    req = tree.request
    withdrawn = "request withdrawn"
    if req is not None and req.target == target.name and req.by == by:
        if not _delete(consul, req.modify_index):
            withdrawn = (f"the request could not be withdrawn: {tree.request.source or 'the leader'} "
                         f"drops it within {format_duration(round(timeout + REQUEST_GRACE_SECONDS))}")
    new = tree.candidates.get(target.name)
    holder = _holder(key)
    if _leads(key, tree, target.name):
        took = time.monotonic() - started
        print(f"switched over: {target.name} holds {k} (took {took:.3f}s)", file=out)
        return EXIT_OK
    if key is not None and new is not None and key.session == new.session:
        raise OperationFailed(f"{target.name} holds {k} but did not say it leads within "
                              f"{format_duration(timeout)} (is its vip-elector stuck? see its log)")
    if holder is None:
        raise OperationFailed(f"{k} became free while waiting (its holder stopped or failed); "
                              f"the candidates compete as usual (candidates: {_names(tree, key)})")
    raise OperationFailed(f"{target.name} did not take over within {format_duration(timeout)}: "
                          f"{holder} still holds {k} ({withdrawn}; see the leader's log; "
                          f"candidates: {_names(tree, key)})")


def _leads(key: Optional[KeyState], tree: Tree, name: str) -> bool:
    """``name`` holds the key and its candidate key says it leads: the switchover is done."""
    new = tree.candidates.get(name)
    return (key is not None and bool(key.session) and new is not None and key.session == new.session
            and new.role == "leader")


def _put_request(consul: ConsulClient, settings: Settings, request: Request, holder: KeyState) -> bool:
    """Write the request (cas=0). An answer that failed or never came may hide a write Consul
    applied (REFERENCE §8): the key says, so that "nothing changed" is never a guess."""
    k = settings.trigger_key
    try:
        with consul.time_limit(WRITE_LIMIT):
            return consul.put_request(request.to_json(), cas=0)
    except PermissionDenied as e:
        raise OperationFailed(f"{settings.token_words} may not write {k}/switchover: {e}; give it "
                              f"key_prefix \"{k}/\" write (see examples/consul-acl-policy.hcl)") from None
    except ConsulError as e:
        error = e
    try:
        with consul.time_limit(WRITE_LIMIT):
            _, key, tree = _read(consul, settings)
    except OperationFailed:
        raise OperationFailed(f"cannot write the switchover request to Consul at {settings.address} "
                              f"({error}), nor read back whether it was written: see 'vip-elector "
                              f"list', and try again once Consul answers") from None
    req = tree.request
    if req is not None and req.by == request.by and req.requested == request.requested:
        return True  # written after all: carry on
    target = tree.candidates.get(request.target)
    if key is not None and target is not None and key.session == target.session != holder.session:
        return True  # written, and carried out (the leader deleted it) before we read it back
    raise OperationFailed(f"cannot write the switchover request to Consul at {settings.address} "
                          f"({error}); nothing changed, {holder.value} keeps {k}: try again once "
                          f"Consul answers")


def _read_at_the_end(consul: ConsulClient, settings: Settings, name: str,
                     timeout: float) -> tuple[int, Optional[KeyState], Tree]:
    """The last read, after the timeout: once more on failure (it decides what we say)."""
    try:
        with consul.time_limit(WRITE_LIMIT):
            return _read(consul, settings)
    except OperationFailed:
        time.sleep(0.2)
    try:
        with consul.time_limit(WRITE_LIMIT):
            return _read(consul, settings)
    except OperationFailed as e:
        raise OperationFailed(f"{e}; so whether {name} took over within {format_duration(timeout)} "
                              f"is unknown: see 'vip-elector list'") from None


def _delete(consul: ConsulClient, modify_index: int) -> bool:
    """Delete our request (CAS): True when it is gone, or was changed by another (the leader)."""
    try:
        with consul.time_limit(WRITE_LIMIT):
            consul.delete_request(modify_index)
        return True
    except ConsulError:
        return False  # the leader drops a stale request itself
