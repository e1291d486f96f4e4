"""A real Consul agent for tests, driven and observed through plain HTTP.

Nothing here imports vip_elector or a Consul client library: the tests use
this module to watch the daemon from the outside, so it must not share the
daemon's code (or its bugs).

    agent = ConsulAgent(workdir, node="node-a")      # -dev agent, free ports
    agent.start()                                     # waits for a leader and serfHealth
    agent.kv_put("k", "v"); agent.kv_get("k")["Value"] == b"v"
    agent.register_ttl_check("vip-http"); agent.fail_check("vip-http")
    agent.stop(); agent.start()                       # restart, same ports, empty store
    agent.kill()

ACL mode (`acl=True`): ACLs enabled, default deny, `agent.master_token`
used by every helper here; `agent.create_token(rules)` makes a token with a
policy of its own, `elector_rules(key, node)` are the rules vip-elector needs.

TLS (`tls=True`, `verify_incoming=`): certificates made by `consul tls`,
`agent.https_url`, `agent.ca_file`, `agent.client_cert`/`client_key`.
Cluster: `ConsulAgent(dir, node="node-1", join=server)` is a client agent of
the server agent's cluster (one agent per node, as in production).
`agent.consul_lock(prefix, command)` runs HashiCorp's `consul lock` (Popen).

The binary is $VIP_ELECTOR_CONSUL, else the test cache's Consul 1.8.7
($VIP_ELECTOR_CACHE/consul/usr/bin/consul), else `consul` on PATH.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid

from helpers import wait_for

LOCK_FLAG = 3304740253564472344  # 0x2ddccbc058a50c18, HashiCorp's lock API flag

CACHE = os.environ.get("VIP_ELECTOR_CACHE", "/var/cache/vip-elector-test")


def find_consul():
    """Path of the consul binary, or None."""
    for candidate in (os.environ.get("VIP_ELECTOR_CONSUL"),
                      os.path.join(CACHE, "consul/usr/bin/consul"),
                      shutil.which("consul")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def agent_argv(binary, node, http_port, serf_lan_port, serf_wan_port, server_port, mode=("-dev",)):
    """`consul agent` on 127.0.0.1 with these ports, no DNS, no gRPC; add -data-dir etc."""
    return [binary, "agent"] + list(mode) + [
        "-node", node, "-bind", "127.0.0.1", "-client", "127.0.0.1",
        "-http-port", str(http_port), "-dns-port", "-1", "-grpc-port", "-1",
        "-serf-lan-port", str(serf_lan_port), "-serf-wan-port", str(serf_wan_port),
        "-server-port", str(server_port)]


class ConsulError(Exception):
    def __init__(self, status, body, method, path):
        super().__init__("%s %s -> HTTP %s: %s" % (method, path, status, body[:300]))
        self.status = status
        self.body = body


class ConsulAPI:
    """The HTTP API of one agent, as the tests use it: plain requests, nothing hidden.

    Subclasses give `url` (ConsulAgent: its TCP port) or override `request`
    (tests/vipnet.py: the agent's unix socket); `master_token`, when set, rides
    on every request.
    """

    master_token = None
    url = None

    # --------------------------------------------------------------------- HTTP

    def request(self, method, path, body=None, params=None, token=..., timeout=10):
        """(status, headers, raw body). HTTP errors are returned, not raised."""
        if token is ...:
            token = self.master_token
        if params:
            path += ("&" if "?" in path else "?") + urllib.parse.urlencode(params)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else (
                body.encode() if isinstance(body, str) else json.dumps(body).encode())
        return self.send(method, path, data, {"X-Consul-Token": token} if token else {}, timeout)

    def send(self, method, path, data, headers, timeout):
        """One HTTP exchange: (status, headers, raw body), errors included."""
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def call(self, method, path, body=None, params=None, token=..., timeout=10):
        """Decoded JSON answer (or None for an empty body); raises ConsulError on HTTP >= 400."""
        status, _, raw = self.request(method, path, body, params, token, timeout)
        if status >= 400:
            raise ConsulError(status, raw.decode("utf-8", "replace"), method, path)
        return json.loads(raw) if raw.strip() else None

    def get_json(self, path, params=None):
        return self.call("GET", path, params=params)

    # ----------------------------------------------------------------------- KV

    def kv_get(self, key):
        """The key's entry with Value decoded to bytes (None when absent); consistent read."""
        status, _, raw = self.request("GET", "/v1/kv/" + key, params={"consistent": ""})
        if status == 404:
            return None
        if status >= 400:
            raise ConsulError(status, raw.decode("utf-8", "replace"), "GET", key)
        entry = json.loads(raw)[0]
        entry["Value"] = base64.b64decode(entry["Value"]) if entry.get("Value") else b""
        return entry

    def kv_value(self, key):
        """The key's value as str, or None when absent."""
        entry = self.kv_get(key)
        return None if entry is None else entry["Value"].decode("utf-8", "replace")

    def kv_put(self, key, value, flags=0):
        return self.call("PUT", "/v1/kv/" + key, body=value.encode() if isinstance(value, str) else value,
                         params={"flags": flags} if flags else None)

    def kv_delete(self, key):
        return self.call("DELETE", "/v1/kv/" + key)

    def kv_all(self):
        """{key: (value bytes, flags, session, ModifyIndex)} for the whole store."""
        status, _, raw = self.request("GET", "/v1/kv/", params={"recurse": "", "consistent": ""})
        if status == 404:
            return {}
        if status >= 400:
            raise ConsulError(status, raw.decode("utf-8", "replace"), "GET", "kv recurse")
        return {e["Key"]: (base64.b64decode(e["Value"]) if e.get("Value") else b"",
                           e["Flags"], e.get("Session"), e["ModifyIndex"])
                for e in json.loads(raw)}

    # ----------------------------------------------------------------- sessions

    def sessions(self):
        return self.get_json("/v1/session/list") or []

    def session_info(self, session_id):
        """The session, or None when it does not exist (any more)."""
        found = self.get_json("/v1/session/info/" + session_id)
        return found[0] if found else None

    def holder(self, key):
        """(value, session entry) of a key held by a session, else None."""
        entry = self.kv_get(key)
        if entry is None or not entry.get("Session"):
            return None
        return entry["Value"].decode(), self.session_info(entry["Session"])

    def create_session(self, name="test", checks=("serfHealth",), ttl=None, lock_delay="0s",
                       behavior="release"):
        body = {"Name": name, "Node": self.node, "Checks": list(checks),
                "LockDelay": lock_delay, "Behavior": behavior}
        if ttl:
            body["TTL"] = ttl
        return self.call("PUT", "/v1/session/create", body=body)["ID"]

    def destroy_session(self, session_id):
        return self.call("PUT", "/v1/session/destroy/" + session_id)

    def acquire(self, key, session_id, value=b"", flags=LOCK_FLAG):
        return self.call("PUT", "/v1/kv/" + key, body=value,
                         params={"acquire": session_id, "flags": flags})


class ConsulAgent(ConsulAPI):
    def __init__(self, workdir, node="vip-test-node", acl=False, binary=None,
                 master_token=None, tls=False, verify_incoming=False, join=None):
        self.binary = binary or find_consul()
        if not self.binary:
            raise RuntimeError("no consul binary found")
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.node = node
        self.acl = acl
        self.master_token = (master_token or str(uuid.uuid4())) if acl else None
        (self.http_port, self.serf_lan_port, self.serf_wan_port, self.server_port,
         self.https_port) = free_ports(5)
        self.tls = tls
        self.verify_incoming = verify_incoming
        self.join = join          # a server ConsulAgent: be a client agent of its cluster
        assert not (join and acl), "ACL mode is for a single dev agent"
        if tls:
            self._make_certificates()
        self.proc = None
        self.log_path = os.path.join(self.workdir, "consul-%s.log" % node)
        self.starts = 0

    # ------------------------------------------------------------------ process

    @property
    def http_addr(self):
        return "127.0.0.1:%d" % self.http_port

    @property
    def url(self):
        return "http://" + self.http_addr

    @property
    def https_url(self):
        """HTTPS endpoint (tls=True): certificate for 127.0.0.1/localhost from `ca_file`."""
        return "https://127.0.0.1:%d" % self.https_port

    def _make_certificates(self):
        """A CA, a server and a client certificate, made by `consul tls` (dc1)."""
        d = os.path.join(self.workdir, "tls")
        os.makedirs(d, exist_ok=True)
        for args in (["ca", "create"], ["cert", "create", "-server", "-dc", "dc1"],
                     ["cert", "create", "-client", "-dc", "dc1"]):
            subprocess.run([self.binary, "tls"] + args, cwd=d, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ca_file = os.path.join(d, "consul-agent-ca.pem")
        self.server_cert = os.path.join(d, "dc1-server-consul-0.pem")
        self.server_key = os.path.join(d, "dc1-server-consul-0-key.pem")
        self.client_cert = os.path.join(d, "dc1-client-consul-0.pem")
        self.client_key = os.path.join(d, "dc1-client-consul-0-key.pem")

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def command(self):
        if self.join:
            mode = ["-retry-join", "127.0.0.1:%d" % self.join.serf_lan_port, "-retry-interval", "1s"]
        else:
            mode = ["-dev"]
        cmd = agent_argv(self.binary, self.node, self.http_port, self.serf_lan_port,
                         self.serf_wan_port, self.server_port, mode) + [
            "-data-dir", os.path.join(self.workdir, "data-%s" % self.node), "-log-level", "info"]
        if self.acl:
            cmd += ["-hcl", 'acl { enabled = true default_policy = "deny" '
                            'enable_token_persistence = false '
                            'tokens { master = "%s" agent = "%s" } }'
                    % (self.master_token, self.master_token)]
        if self.tls:
            cmd += ["-hcl", 'ports { https = %d } cert_file = "%s" key_file = "%s" ca_file = "%s" '
                            'verify_incoming_https = %s'
                    % (self.https_port, self.server_cert, self.server_key, self.ca_file,
                       "true" if self.verify_incoming else "false")]
        return cmd

    def start(self, timeout=30):
        """Start (or restart, same ports) and wait until the node can hold sessions."""
        assert not self.running, "agent already running"
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(b"\n===== start %d =====\n" % self.starts)
        log.flush()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        try:
            wait_for(self._ready, timeout, interval=0.05,
                     message="consul agent %s to elect itself and register serfHealth" % self.node)
        except AssertionError:
            self.kill()
            raise AssertionError("consul agent did not come up; log %s:\n%s"
                                 % (self.log_path, self.log_tail()))
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError("consul exited with %s:\n%s" % (self.proc.returncode, self.log_tail()))
        leader = self.get_json("/v1/status/leader")
        if not leader:
            return False
        checks = self.get_json("/v1/health/node/" + self.node)
        return any(c["CheckID"] == "serfHealth" and c["Status"] == "passing" for c in checks)

    def stop(self, timeout=15):
        """Graceful stop (SIGINT: the agent leaves the cluster, like `systemctl stop consul`)."""
        if self.running:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self):
        if self.running:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, timeout=30):
        self.stop()
        return self.start(timeout)

    def log_tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()

    # ------------------------------------------------------------------- checks

    def register_ttl_check(self, check_id, status="passing", ttl="10m"):
        """A node-level check the test drives by hand (TTL long enough not to expire)."""
        self.call("PUT", "/v1/agent/check/register",
                  body={"ID": check_id, "Name": check_id, "TTL": ttl, "Status": status})
        self._wait_check(check_id, status)

    def set_check(self, check_id, status, note=""):
        verb = {"passing": "pass", "warning": "warn", "critical": "fail"}[status]
        self.call("PUT", "/v1/agent/check/%s/%s" % (verb, check_id), params={"note": note} if note else None)
        self._wait_check(check_id, status)

    def pass_check(self, check_id):
        self.set_check(check_id, "passing")

    def warn_check(self, check_id):
        self.set_check(check_id, "warning")

    def fail_check(self, check_id):
        self.set_check(check_id, "critical")

    def deregister_check(self, check_id):
        self.call("PUT", "/v1/agent/check/deregister/" + check_id)
        wait_for(lambda: self.check_status(check_id) is None, 10,
                 message="check %s to leave the catalog" % check_id)

    def check_status(self, check_id):
        """Status of the check in the catalog (what sessions are judged by), or None."""
        for c in self.get_json("/v1/health/node/" + self.node):
            if c["CheckID"] == check_id:
                return c["Status"]
        return None

    def _wait_check(self, check_id, status):
        # Agent → catalog sync is asynchronous; sessions look at the catalog.
        wait_for(lambda: self.check_status(check_id) == status, 10,
                 message="check %s to be %s in the catalog" % (check_id, status))

    # ---------------------------------------------------------------------- ACL

    def create_token(self, rules, description="test token"):
        """SecretID of a new token carrying a new policy with these HCL rules."""
        assert self.acl, "agent not in ACL mode"
        policy = self.call("PUT", "/v1/acl/policy",
                           body={"Name": "p-" + uuid.uuid4().hex[:12], "Rules": rules})
        token = self.call("PUT", "/v1/acl/token",
                          body={"Description": description,
                                "Policies": [{"ID": policy["ID"]}]})
        return token["SecretID"]

    # -------------------------------------------------------------- consul lock

    def consul_lock(self, prefix, command, extra_args=(), env=None, **popen):
        """Start HashiCorp's `consul lock PREFIX COMMAND` against this agent (a Popen)."""
        args = [self.binary, "lock", "-http-addr=" + self.url]
        if self.master_token:
            args.append("-token=" + self.master_token)
        args += list(extra_args) + [prefix, command]
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        child_env.update(env or {})
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.STDOUT)
        return subprocess.Popen(args, env=child_env, stdin=subprocess.DEVNULL,
                                start_new_session=True, **popen)


EXAMPLE_POLICY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "examples", "consul-acl-policy.hcl")


EXAMPLE_KEY = "service/haproxy-vip/leader"   # examples/vip-manager.yml's trigger-key
EXAMPLE_NODE = "node-a"                      # and its trigger-value, the node's name


def elector_rules(key, node):
    """The least privilege vip-elector needs: examples/consul-acl-policy.hcl,
    with its example key and node names replaced (so the tests prove the example)."""
    with open(EXAMPLE_POLICY) as f:
        text = f.read()
    assert '"%s"' % EXAMPLE_KEY in text and '"%s"' % EXAMPLE_NODE in text, "example policy changed"
    # The key, and the key_prefix "<key>/" of its candidates and switchover request (SPEC §11).
    return text.replace('"%s' % EXAMPLE_KEY, '"%s' % key).replace('"%s"' % EXAMPLE_NODE, '"%s"' % node)
