"""A Consul dev agent on free ports, for the systemd tests.

TO CONSOLIDATE: tests/consul_agent.py and the `consul` fixture of
tests/conftest.py (branch `harness`) do the same and more. Once they are in
main, test_systemd_notify.py and test_systemd_container.py should use them
and this file should go.

    agent = LocalConsul(workdir)     # started, leader elected, serfHealth passing
    agent.addr                       # '127.0.0.1:PORT'
    agent.key('service/x/leader')    # (value, session) or None
    agent.session(session_id)        # the session's JSON or None
    agent.stop()
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

CACHE = os.environ.get('VIP_ELECTOR_CACHE', '/var/cache/vip-elector-test')


def wait_for(condition, timeout, message, interval=0.05):
    """Poll condition() until it is true (returns its value) or fail naming `message`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout}s waiting for {message}')
        time.sleep(interval)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(('127.0.0.1', 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalConsul:
    NODE = 'vip-systemd-test'

    def __init__(self, workdir):
        binary = os.environ.get('VIP_ELECTOR_CONSUL') or os.path.join(CACHE, 'consul/usr/bin/consul')
        if not os.access(binary, os.X_OK):
            binary = shutil.which('consul')
        if not binary:
            pytest.skip('no consul binary: run tests/tools/fetch-deps')
        http, lan, wan, server = free_ports(4)
        self.addr = f'127.0.0.1:{http}'
        self.log_path = os.path.join(workdir, 'consul.log')
        self.log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(
            [binary, 'agent', '-dev', '-node', self.NODE, '-bind', '127.0.0.1',
             '-client', '127.0.0.1', '-http-port', str(http), '-dns-port', '-1',
             '-grpc-port', '-1', '-serf-lan-port', str(lan), '-serf-wan-port', str(wan),
             '-server-port', str(server), '-data-dir', os.path.join(workdir, 'data')],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for(self._ready, 30, 'the Consul agent to elect itself and be healthy')
        except AssertionError:
            self.stop()
            raise

    def get(self, path):
        with urllib.request.urlopen(f'http://{self.addr}{path}', timeout=5) as r:
            return json.loads(r.read() or b'null')

    def _ready(self):
        try:
            checks = self.get(f'/v1/health/node/{self.NODE}')
            return any(c['CheckID'] == 'serfHealth' and c['Status'] == 'passing' for c in checks)
        except (OSError, ValueError):
            return False

    def key(self, key):
        """(value, session) of the key, or None when it does not exist."""
        try:
            entry = self.get(f'/v1/kv/{key}')[0]
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise
        return base64.b64decode(entry['Value'] or '').decode(), entry.get('Session')

    def session(self, session_id):
        found = self.get(f'/v1/session/info/{session_id}')
        return found[0] if found else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()

    def put(self, path, body=None):
        data = json.dumps(body).encode() if body is not None else b''
        req = urllib.request.Request(f'http://{self.addr}{path}', data=data, method='PUT')
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read() or b'null')

    def register_ttl_check(self, check_id, status='passing'):
        self.put('/v1/agent/check/register',
                 {'ID': check_id, 'Name': check_id, 'TTL': '10m', 'Status': status})

    def fail_check(self, check_id):
        self.put(f'/v1/agent/check/fail/{check_id}')

    def deregister_check(self, check_id):
        self.put(f'/v1/agent/check/deregister/{check_id}')
