"""``vip-elector --check``: what an operator runs before ``systemctl start``.

Every line answers one question (is the configuration valid, does Consul
answer, may the token do what the daemon needs, is the check passing, what is
in the key), and nothing is changed in Consul except a throw-away session
that proves session rights and health, destroyed at once.

A line that fails says why and what to do. Consul hides from a token what it
may not read instead of refusing, so "not there" is only said once the token
is known to be able to see it; otherwise the report names the missing right.
The exit status is 0 when every line is ok and 1 otherwise, a configuration
error included (``cli._check_config_error``): the report is what an operator reads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

from .config import Settings, format_duration
from .consul import (SERF_HEALTH, CheckNotPassing, ConsulClient, ConsulError, KeyState,
                     PermissionDenied, describe_holder, untested_library)

POLICY_EXAMPLE = "/usr/share/doc/vip-elector/examples/consul-acl-policy.hcl"


def rule_for(call: Optional[str], settings: Settings, node: Optional[str]) -> Optional[str]:
    """The ACL rule a refused call needs, as a policy writes it (None: not one of ours).

    Consul 1.8 answers a missing right with a bare "Permission denied"; the
    call tells which rule it was (found by experiment, consul-acl-policy.hcl).
    """
    path = call.split(" ", 1)[-1] if call else ""
    if path.startswith("/v1/kv/") or path == "/v1/txn":
        return f'key "{settings.trigger_key}" {{ policy = "write" }}'
    if path.startswith("/v1/session/"):
        return f'session "{node}" {{ policy = "write" }}' if node else 'session_prefix "" { policy = "write" }'
    if path.startswith("/v1/agent/self"):
        return f'agent "{node}" {{ policy = "read" }}' if node else 'agent_prefix "" { policy = "read" }'
    return None


def refusal(settings: Settings, error: PermissionDenied, node: Optional[str]) -> str:
    """Which call Consul refused, why, and the rule (or token) that fixes it, in one sentence."""
    who = settings.token_words
    call = f" {error.call}" if error.call else ""
    if error.unknown_token:
        return (f"Consul does not know {who} (ACL not found on{call or ' a request'}): the token is "
                "deleted or mistyped; set the SecretID of an existing token (consul acl token list)")
    rule = rule_for(error.call, settings, node)
    rights = f"{rule} ({POLICY_EXAMPLE})" if rule else f"the rights in {POLICY_EXAMPLE}"
    if not settings.token:
        return (f"{who} is refused{call} ({error.reason}): set a token whose policy has {rights}: "
                "CONSUL_HTTP_TOKEN in /etc/default/vip-elector, or --token-file")
    return f"{who} is refused{call} ({error.reason}): add {rights} to its policy"


@dataclass
class _Probe:
    """The throw-away session: did Consul create it, and if not, why."""

    created: bool = False
    node: Optional[str] = None
    error: Optional[ConsulError] = None


def _probe_session(settings: Settings, consul: ConsulClient, checks: Optional[list[str]] = None) -> _Probe:
    """Create and destroy a session bound to the checks: Consul's own verdict on them."""
    try:
        session = consul.create_session(settings.checks if checks is None else checks)
    except ConsulError as e:
        return _Probe(error=e)
    probe = _Probe(created=True)
    try:
        info = consul.session_info(session)
        probe.node = info.node if info else None
    except ConsulError:
        pass
    try:
        consul.destroy_session(session)
    except ConsulError:
        pass  # it has a TTL: Consul removes it anyway
    return probe


def key_lines(settings: Settings, consul: ConsulClient, key: Optional[KeyState]) -> tuple[bool, str]:
    """(ok, text) for the trigger-key's state (SPEC §4.6)."""
    k = settings.trigger_key
    if key is None:
        return True, f"trigger-key {k} is free"
    if not key.is_lock:
        if key.session:
            return False, (f"trigger-key {k} is held by {describe_holder(consul, key)}, another "
                           f"program's lock (flags {key.flags}, not a vip-elector lock): it is in use; "
                           "choose another trigger-key for vip-manager and vip-elector")
        return False, (f"trigger-key {k} is not a lock key (flags {key.flags}) and no session holds it: "
                       f"if nothing uses it any more, remove it with 'consul kv delete {k}'; "
                       "otherwise choose another trigger-key")
    if key.session:
        return True, f"trigger-key {k} is held by {key.value!r} ({describe_holder(consul, key)})"
    return True, f"trigger-key {k} is free (last value {key.value!r})"


def _hidden_check_right(node: Optional[str], node_visible: bool) -> str:
    """Which right hides a check that exists: node:read for a node's check, service:read
    for a service's. The token's view of the catalog tells which one it lacks.

    Found by experiment (Consul 1.8.7): /v1/agent/checks shows a node's check
    only with node:read on the node, a service's check only with service:read
    on its service (node:read does not show it, nor is it needed for it).
    """
    service_rule = ('service "NAME" { policy = "read" }, NAME the service the check belongs to '
                    f'(service "haproxy" in {POLICY_EXAMPLE})')
    if node_visible:  # node:read is there (serfHealth is seen): the check is a service's
        return f"it is a service's check and the token lacks service:read on that service: add {service_rule}"
    where = f'node "{node}"' if node else 'node_prefix ""'
    return (f"the token lacks node:read on {'node ' + node if node else 'this node'} (a node's "
            f"check) or service:read on the check's service (a service's check): add {where} "
            f"{{ policy = \"read\" }} or {service_rule}")


def check_lines(settings: Settings, consul: ConsulClient, check_id: str, node: Optional[str],
                probe: _Probe) -> list[tuple[bool, str]]:
    """What the agent, the catalog and the session probe say about --check-id, in words."""
    who = settings.token_words
    try:
        agent = consul.visible_checks()
    except PermissionDenied as e:
        return [(False, f"check '{check_id}': cannot read the agent's checks: {refusal(settings, e, node)}")]
    except ConsulError as e:
        return [(False, f"check '{check_id}': cannot read the agent's checks: {e}")]
    catalog: Optional[dict[str, str]] = None
    if node:
        try:
            catalog = consul.catalog_checks(node)
        except ConsulError:
            catalog = None
    node_visible = catalog is not None and SERF_HEALTH in catalog
    verdict = probe.error if isinstance(probe.error, CheckNotPassing) and \
        probe.error.check_id == check_id else None
    missing_in_catalog = verdict is not None and verdict.state is None

    if check_id in agent:
        state = agent[check_id]
        lines = [(state != "critical", f"check '{check_id}' is {state} on the local agent")]
        if (node_visible and check_id not in catalog) or missing_in_catalog:
            lines.append((False, (
                f"check '{check_id}': the local agent has it but the catalog does not (Consul "
                "judges sessions by the catalog): the agent could not register it with the "
                "servers, because the token it registers the check with (the check definition's "
                "'token', else the agent's acl.tokens.default) lacks node:write (service:write for "
                "a service's check); the agent's log says 'blocked by ACLs'. Give the check "
                "definition a token with that right, reload the agent, then check again")))
        return lines
    # Consul judged a session bound to the check: it exists, whatever the token may see.
    if probe.created or (verdict is not None and verdict.state == "critical"):
        state = ("not critical (a session bound to it was created)" if probe.created
                 else "critical (Consul refused a session bound to it)")
        return [(False, f"check '{check_id}' is registered and {state}, but {who} cannot see it, "
                        "and vip-elector reads it to know when to compete: "
                        f"{_hidden_check_right(probe.node or node, node_visible)}")]
    others = sorted(set(agent) | set(catalog or {}))
    listed = ", ".join(f"'{c}'" for c in others) if others else "none"
    if missing_in_catalog:
        on = f" (node {probe.node or node})" if probe.node or node else ""
        return [(False, f"check '{check_id}' is not registered on the local agent{on}: Consul "
                        f"refused a session bound to it (no such check); the checks {who} may see: {listed}. "
                        "Register it (examples/consul-service-check.hcl) or give --check-id one "
                        "of these")]
    if node and not node_visible:
        return [(False, f"check '{check_id}' cannot be seen, and it may well be registered: "
                        f"{_hidden_check_right(node, False)}")]
    if not node:
        return [(False, f"check '{check_id}' cannot be seen: {who} may read neither the agent "
                        "(agent:read) nor create a session on this node, so whether the check exists "
                        f"is unknown; give the token the rights in {POLICY_EXAMPLE}")]
    return [(False, f"check '{check_id}' is not registered on the local agent (node {node}); the "
                    f"checks it has: {listed}. Register it (examples/consul-service-check.hcl) or "
                    "give --check-id one of these; for a service's check the token also needs "
                    "service:read on that service")]


def _unreadable_peer(settings: Settings, consul: ConsulClient, node: Optional[str]) -> Optional[str]:
    """Another candidate's node this token cannot read in the catalog (SPEC §11.4's stickiness
    reads the former holder's node), or None; a read Consul refuses or fails is no verdict."""
    from .cluster import Tree
    try:
        _, _, entries = consul.read_tree()
        peers = {c.node for c in Tree.build(settings.trigger_key, entries, settings.value).candidates.values()
                 if c.node and c.node != node and c.name != settings.value}
        for peer in sorted(peers):
            if not consul.catalog_checks(peer):  # serfHealth is always there for a visible node
                return peer
    except ConsulError:
        return None
    return None


def vip_lines(settings: Settings) -> list[tuple[bool, str]]:
    """--manage-vip: the address as configured, and whether this node has it now (SPEC §12)."""
    from .address import AddressError, VirtualAddress
    vip = settings.vip
    try:
        with VirtualAddress(vip, announce=False, manage=False) as address:
            present = address.present()
            unusable = address.unusable()
    except AddressError as e:
        return [(False, f"VIP {vip} (--manage-vip): {e}")]
    if unusable:
        return [(False, f"VIP {vip} (--manage-vip): {unusable}; until it is usable this node does "
                        "not compete (a leader gives the key up)")]
    where = "is on this node now" if present else "is not on this node now"
    return [(True, f"VIP {vip} (--manage-vip, from {settings.config_path}) {where}")]


def run_check(settings: Settings, consul: ConsulClient, out: TextIO = sys.stdout) -> bool:
    """Print the report; True if every line is ok."""
    failures = 0
    who = settings.token_words
    node: Optional[str] = None  # the agent's node, once known: it names the rules to add

    def report(ok: bool, text: str) -> bool:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {text}", file=out)
        return ok

    def attempt(what: str, fn: Callable):
        try:
            return True, fn()
        except PermissionDenied as e:
            return report(False, f"{what}: {refusal(settings, e, node)}"), None
        except ConsulError as e:
            return report(False, f"{what}: {e}"), None

    report(True, f"configuration {settings.config_path}: key {settings.trigger_key}, value "
                 f"{settings.value}, ttl {format_duration(settings.ttl)}, lock-delay "
                 f"{format_duration(settings.lock_delay)}, {who}")
    for warning in settings.warnings:
        print(f"warn  {warning}", file=out)
    if settings.metrics_address is not None:
        from .metrics import check_address
        report(*check_address(settings.metrics_address, settings.trigger_key))
    untested = untested_library()
    if untested:
        print(f"warn  {untested}", file=out)

    if settings.vip is not None:
        for line in vip_lines(settings):
            report(*line)
    ok, key = attempt(f"Consul at {settings.address}", lambda: consul.read_key()[1])
    if not ok:
        print(f"{failures} problem(s) found", file=out)
        return False
    try:
        node = consul.node_name()
    except ConsulError:
        node = None
    probe = _probe_session(settings, consul)
    node = node or probe.node
    if node is None and isinstance(probe.error, CheckNotPassing):
        # Without agent:read, a session bound to serfHealth alone tells the node's name.
        node = _probe_session(settings, consul, [SERF_HEALTH]).node
    if node:
        report(True, f"Consul at {settings.address} answers (agent node {node})")
    else:
        report(True, f"Consul at {settings.address} answers ({who} may not read the agent: agent:read "
                     "is not needed, but the node's name is unknown)")
    report(*key_lines(settings, consul, key))

    ok, _ = attempt(f"write right on {settings.trigger_key}", consul.can_write_key)
    if ok:
        report(True, f"{who} may write {settings.trigger_key}")
    try:  # SPEC §11: not needed to lead, only for 'list' and 'switchover': a warning
        consul.can_write_candidate()
    except PermissionDenied as e:
        print(f"warn  {who} may not write {settings.trigger_key}/candidates/ ({e}): the node still "
              f"leads, but 'vip-elector list' will not show it and a switchover cannot choose it; "
              f"add key_prefix \"{settings.trigger_key}/\" {{ policy = \"write\" }} ({POLICY_EXAMPLE})",
              file=out)
    except ConsulError as e:
        report(False, f"write right on {settings.trigger_key}/candidates/: {e}")

    hidden = _unreadable_peer(settings, consul, node)
    if hidden:
        print(f"warn  {who} may not read node {hidden}, where another candidate runs: when Consul "
              f"ends a leader's session the others cannot tell a stale 'failed' verdict (a partition "
              f"healing) from a failure, so a failover waits 0.5 s longer and may move the VIP a "
              f"second time; add node_prefix \"\" {{ policy = \"read\" }} ({POLICY_EXAMPLE})", file=out)

    for check_id in settings.check_ids:  # each --check-id (SPEC §11.5)
        for line in check_lines(settings, consul, check_id, node, probe):
            report(*line)

    e = probe.error
    if probe.created:
        report(True, "a session bound to the checks can be created")
    elif isinstance(e, PermissionDenied):
        report(False, f"{who} may not create sessions: {refusal(settings, e, node)}")
    elif e is not None:  # CheckNotPassing (its message names the check), or Consul erring
        report(False, f"a session cannot be created: {e}")

    print("all checks passed" if not failures else f"{failures} problem(s) found", file=out)
    return not failures
