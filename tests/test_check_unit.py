"""`--check`'s report against a stand-in Consul: every failure is a line, never a traceback.

Fast (no agent): run by `make unit` and by the package build. What a real
agent answers is proven in test_check_report.py; here, the failures a real
agent cannot be made to produce on cue — an agent that stops answering
between two of the report's calls, at each of them in turn.
"""

import io

import pytest

from vip_elector.check import run_check
from vip_elector.config import Settings
from vip_elector.consul import (LOCK_FLAG, ConsulUnreachable, KeyState, PermissionDenied,
                                SessionInfo)

CALLS = ("read_key", "node_name", "create_session", "session_info", "destroy_session",
         "can_write_key", "can_write_candidate", "visible_checks", "catalog_checks", "read_tree")
# Calls whose failure the report rightly shrugs off: words for messages (node_name),
# the probe's own clean-up (session_info, destroy_session: the session has a TTL),
# a cross-check the session probe settles (catalog_checks), the other candidates (read_tree:
# only for a warning).
NOT_A_PROBLEM = ("node_name", "session_info", "destroy_session", "catalog_checks", "read_tree")


def settings(**kw):
    base = dict(config_path="/etc/vip-manager.yml", trigger_key="service/pg/leader", value="node-a",
                scheme="http", host="127.0.0.1", port=8500, check_id="pg-primary")
    base.update(kw)
    return Settings(**base)


class StandIn:
    """Answers like a healthy agent; `fail[name]` makes that call raise instead."""

    def __init__(self, key=None, hidden=(), **fail):
        self.key, self.fail, self.calls = key, fail, []
        self.hidden = set(hidden)  # nodes the token may not read (Consul shows nothing of them)

    def _call(self, name):
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]

    def read_key(self, index=None, wait=None, key=None):
        self._call("read_key")
        return 7, self.key

    def node_name(self):
        self._call("node_name")
        return "node1"

    def create_session(self, checks):
        self._call("create_session")
        return "s-1"

    def session_info(self, sid):
        self._call("session_info")
        return SessionInfo(sid, "patroni-pg1" if sid == "other" else "vip-elector-node-a", "node1",
                           frozenset({"serfHealth"}), 10.0, 1.0, "delete")

    def destroy_session(self, sid):
        self._call("destroy_session")

    def can_write_key(self):
        self._call("can_write_key")

    def can_write_candidate(self):  # SPEC §11 (a warning only)
        self._call("can_write_candidate")

    def visible_checks(self):
        self._call("visible_checks")
        return {"serfHealth": "passing", "pg-primary": "passing"}

    def catalog_checks(self, node):
        self._call("catalog_checks")
        return {} if node in self.hidden else {"serfHealth": "passing", "pg-primary": "passing"}

    def read_tree(self, index=None, wait=None):
        """Another candidate, node-b on node2, besides our own candidate key."""
        from vip_elector.cluster import Entry
        self._call("read_tree")
        return 7, self.key, [Entry("service/pg/leader/candidates/node-b", '{"node": "node2"}', "s-b", 5),
                             Entry("service/pg/leader/candidates/node-a", '{"node": "node1"}', "s-1", 6)]


def report(consul, **kw):
    out = io.StringIO()
    ok = run_check(settings(**kw), consul, out)
    return ok, out.getvalue()


def test_all_well():
    ok, text = report(StandIn())
    assert ok and text.rstrip().endswith("all checks passed"), text
    assert "FAIL" not in text


@pytest.mark.parametrize("call", CALLS)
def test_agent_that_stops_answering_at_any_call_is_a_report_not_a_traceback(call):
    consul = StandIn(**{call: ConsulUnreachable("no answer (timed out)")})
    ok, text = report(consul)
    assert call in consul.calls
    lines = text.splitlines()
    assert all(line.startswith(("ok", "FAIL", "warn")) for line in lines[:-1]), text
    if call in NOT_A_PROBLEM:
        assert ok and lines[-1] == "all checks passed", text
        assert not [line for line in lines if line.startswith("FAIL")], text
    else:
        assert not ok and lines[-1].endswith("problem(s) found"), text
        assert any(line.startswith("FAIL") and "no answer (timed out)" in line for line in lines), text


def test_a_token_that_cannot_read_another_candidates_node_is_warned():
    ok, text = report(StandIn())
    assert "may not read node" not in text, text
    ok, text = report(StandIn(hidden={"node2"}))
    warn = [line for line in text.splitlines() if "may not read node node2" in line]
    assert ok and warn and 'node_prefix "" { policy = "read" }' in warn[0], text


def test_refused_write_names_the_token_and_the_fix():
    ok, text = report(StandIn(can_write_key=PermissionDenied("Permission denied")))
    fail = [line for line in text.splitlines() if line.startswith("FAIL")]
    assert not ok and len(fail) == 1, text
    assert "no token (anonymous)" in fail[0] and "consul-acl-policy.hcl" in fail[0], fail[0]
    assert "the token from none" not in text


def test_key_of_another_programs_lock_names_the_holder_and_never_advises_deleting():
    key = KeyState("pg1", 0, "other", 12)
    ok, text = report(StandIn(key=key))
    line = next(line for line in text.splitlines() if line.startswith("FAIL"))
    assert "patroni-pg1" in line and "node1" in line and "choose another trigger-key" in line, line
    assert "delete" not in text


def test_own_lock_key_held_by_a_node_is_fine():
    ok, text = report(StandIn(key=KeyState("node-b", LOCK_FLAG, "s-b", 12)))
    assert ok, text
    assert "held by 'node-b'" in text
