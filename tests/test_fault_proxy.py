"""The fault proxy itself (tests/fault_proxy.py), against a tiny in-process
upstream: fast, no Consul. If the proxy lied about what it injects, the
fault tests built on it would prove nothing."""

import http.client
import json
import socket
import time

import pytest

from fault_proxy import (KV, Cut, Delay, DropAnswer, FaultProxy, Hang, Index, not_json, status_500,
                         too_many_requests)
from tiny_http import TinyServer


class Upstream:
    """Answers JSON with a growing X-Consul-Index; counts what reached it."""

    def __init__(self):
        self.index = 100

    def __call__(self, seen):
        self.index += 1
        return 200, {"X-Consul-Index": str(self.index), "Content-Type": "application/json"}, \
            json.dumps({"path": seen.path, "query": seen.query, "body": seen.body.decode()})


@pytest.fixture
def upstream():
    with TinyServer(Upstream()) as server:
        yield server


@pytest.fixture
def proxy(upstream):
    with FaultProxy(upstream.addr) as p:
        yield p


def connect(proxy, timeout=5.0):
    host, port = proxy.addr.split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def call(conn, method, target, body=None):
    conn.request(method, target, body=body)
    response = conn.getresponse()
    return response.status, response.getheader("X-Consul-Index"), response.read()


def test_forwards_with_keep_alive_and_records(proxy, upstream):
    conn = connect(proxy)
    t0 = time.monotonic()
    for i in range(3):
        status, index, body = call(conn, "PUT", "/v1/kv/a/b?acquire=s1&flags=3", body=b"v%d" % i)
        assert status == 200 and int(index) > 100
        assert json.loads(body) == {"path": "/v1/kv/a/b", "query": {"acquire": "s1", "flags": "3"},
                                    "body": "v%d" % i}
    assert len(upstream.seen) == 3
    seen = proxy.requests("PUT", KV + "a/b", query={"acquire": True}, since=t0)
    assert [r.status for r in seen] == [200, 200, 200] and all(r.fault is None for r in seen)
    assert len({id(c) for c in proxy._clients}) == 1, "one keep-alive connection"
    assert proxy.requests("PUT", KV + "a/b", query={"acquire": False}) == []


def test_respond_once_then_forward(proxy, upstream):
    rule = proxy.inject(status_500(), "PUT", KV + "k", query={"acquire": True}, times=1)
    conn = connect(proxy)
    assert call(conn, "GET", "/v1/kv/k")[0] == 200          # does not match: forwarded
    status, _, body = call(conn, "PUT", "/v1/kv/k?acquire=x")
    assert status == 500 and body.startswith(b"rpc error making call")
    assert call(conn, "PUT", "/v1/kv/k?acquire=x")[0] == 200
    assert len(rule.hits) == 1 and len(upstream.seen) == 2, "the faulted request never reached Consul"
    assert [r.status for r in proxy.requests("PUT")] == [500, 200]


def test_times_skip_and_until_cleared(proxy):
    rule = proxy.inject(too_many_requests(), "GET", times=None, skip=1)
    conn = connect(proxy)
    assert [call(conn, "GET", "/v1/kv/x")[0] for _ in range(4)] == [200, 429, 429, 429]
    proxy.clear(rule)
    assert call(conn, "GET", "/v1/kv/x")[0] == 200


def test_not_json(proxy):
    proxy.inject(not_json(), "GET", times=1)
    _, _, body = call(connect(proxy), "GET", "/v1/kv/x")
    with pytest.raises(ValueError):
        json.loads(body)


@pytest.mark.parametrize("mode, expect", [("zero", ["0", "0"]), ("missing", [None, None]),
                                          ("backwards", ["100", "99"])])
def test_index_lies(proxy, mode, expect):
    proxy.inject(Index(mode), "GET", query={"index": True}, times=None)
    conn = connect(proxy)
    got = [call(conn, "GET", "/v1/kv/x?index=5&wait=1s")[1] for _ in range(2)]
    assert got == expect
    assert call(conn, "GET", "/v1/kv/x")[1] == "103", "without index=: the truth"


def test_cut_in_the_middle(proxy):
    proxy.inject(Cut(), "GET")
    conn = connect(proxy)
    conn.request("GET", "/v1/kv/x")
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()


def test_hang_until_the_client_gives_up_or_the_rule_is_cleared(proxy):
    rule = proxy.inject(Hang(), "PUT", r"/v1/session/renew/.*", times=None)
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        call(connect(proxy, timeout=0.5), "PUT", "/v1/session/renew/abc")
    assert 0.4 < time.monotonic() - t0 < 3
    renew = proxy.wait_request("PUT", r"/v1/session/renew/.*", since=t0, timeout=1)
    assert renew.status is None and renew.fault == "hang"
    conn = connect(proxy, timeout=10)
    conn.request("PUT", "/v1/session/renew/abc")
    rule.wait_hits(2, 5)
    t1 = time.monotonic()
    rule.clear()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.getresponse()
    assert time.monotonic() - t1 < 2


def test_delay(proxy):
    proxy.inject(Delay(0.6), "GET")
    t0 = time.monotonic()
    assert call(connect(proxy), "GET", "/v1/kv/x")[0] == 200
    assert time.monotonic() - t0 >= 0.6


def test_drop_answer_applies_the_request(proxy, upstream):
    rule = proxy.inject(DropAnswer(), "PUT", KV + "k", query={"acquire": True})
    with pytest.raises(socket.timeout):
        call(connect(proxy, timeout=0.5), "PUT", "/v1/kv/k?acquire=s")
    assert [s.query for s in upstream.seen] == [{"acquire": "s"}], "Consul got it"
    assert rule.hits[0].upstream_status == 200 and rule.hits[0].status is None


def test_fail_all_hang_then_heal(proxy):
    conn = connect(proxy, timeout=0.5)
    assert call(conn, "GET", "/v1/kv/x")[0] == 200
    proxy.fail_all()
    with pytest.raises(socket.timeout):
        call(conn, "GET", "/v1/kv/x")
    proxy.heal()
    assert call(connect(proxy), "GET", "/v1/kv/x")[0] == 200


def test_fail_all_refuse_then_heal(proxy):
    conn = connect(proxy)
    assert call(conn, "GET", "/v1/kv/x")[0] == 200
    port = proxy.port
    proxy.fail_all("refuse")
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        call(conn, "GET", "/v1/kv/x")
    with pytest.raises(ConnectionRefusedError):
        call(connect(proxy), "GET", "/v1/kv/x")
    proxy.heal()
    assert proxy.port == port
    assert call(connect(proxy), "GET", "/v1/kv/x")[0] == 200


def test_blocking_answer_in_flight_is_held_back_while_cut_off(upstream):
    """An answer Consul gives while the node is cut off never reaches it."""
    slow = TinyServer(lambda seen: (time.sleep(0.5), (200, {"X-Consul-Index": "9"}, "[]"))[1])
    with slow, FaultProxy(slow.addr) as proxy:
        conn = connect(proxy, timeout=1.0)
        conn.request("GET", "/v1/kv/x?index=3&wait=1s")
        proxy.wait_request("GET", timeout=1)
        proxy.fail_all()
        with pytest.raises(socket.timeout):
            conn.getresponse()
        assert proxy.requests("GET")[0].upstream_status == 200
