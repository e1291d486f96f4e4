"""Command line and configuration, black box (SPEC §2, §3, §5).

Bad input: exit 78 (configuration) or 2 (usage), one line on stderr that
names the file or flag, no traceback, and nothing written to Consul even
though the configuration points at a live agent.
"""

import os
import re
import string
import subprocess
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elector_process import PYTHON, REPO, elector_env, run_elector
from helpers import go_duration, sessions_named, wait_for

pytestmark = pytest.mark.consul


def version_in_source():
    text = open(os.path.join(REPO, "vip_elector", "__init__.py")).read()
    return re.search(r'__version__\s*=\s*["\']([^"\']+)', text).group(1)


def stderr_lines(result):
    return [l for l in result.stderr.splitlines() if l.strip()]


def assert_config_error(result, *must_name, code=78):
    lines = stderr_lines(result)
    codes = code if isinstance(code, (set, tuple)) else {code}
    assert result.returncode in codes, "exit %s, want %s; stderr:\n%s" % (result.returncode, codes, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    if result.returncode == 78:
        assert len(lines) == 1, "want exactly one line, got:\n%s" % result.stderr
    line = lines[-1] if lines else ""
    for word in must_name:          # a tuple: any one of these
        alternatives = word if isinstance(word, tuple) else (word,)
        assert any(w.lower() in line.lower() for w in alternatives), "%r not named in %r" % (word, line)
    return line


@pytest.fixture
def untouched(consul):
    """Asserts at teardown that the test wrote nothing to Consul."""
    kv = consul.kv_all()
    names = {s["Name"] for s in consul.sessions()}
    yield consul
    # Nothing added or modified (a key may vanish: an earlier test's leftover
    # session expiring with behaviour delete is no business of this test).
    changed = {k: v for k, v in consul.kv_all().items() if kv.get(k) != v}
    assert not changed, "KV store changed: %s" % changed
    new = {s["Name"] for s in consul.sessions()} - names
    assert not {n for n in new if n.startswith("vip-elector")}, new


def test_version():
    r = run_elector(["--version"])
    assert r.returncode == 0, r.stderr
    assert version_in_source() in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------- bad config files

GOOD = {"dcs-type": "consul", "trigger-key": "service/bad/leader"}


def yaml_of(**changes):
    data = dict(GOOD)
    for k, v in changes.items():
        k = k.replace("_", "-")
        if v is ...:
            data.pop(k, None)
        else:
            data[k] = v
    return yaml.safe_dump(data)


BAD_FILES = {
    # id: (content (str/bytes) or None for "does not exist", words the line must name besides the path);
    # an env file's line names the variable to change, in the file's own syntax
    "missing-file": (None, ()),
    "empty": ("", ()),
    "whitespace-only": ("\n   \n", ()),
    "not-yaml": ("dcs-type: [consul\ntrigger-key: x\n", ()),
    "binary": (b"\x00\xff\xfe\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xde\xad\xbe\xef", ()),
    "latin1-garbage": ("dcs-type: consul\ntrigger-key: caf\xe9\n".encode("latin-1") + b"\xff\xfe", ()),
    "list": ("- dcs-type: consul\n- trigger-key: service/x/leader\n", ()),
    "scalar": ("just some words\n", ()),
    "dcs-type-missing": (yaml_of(dcs_type=...), ("dcs-type",)),
    "dcs-type-etcd": (yaml_of(dcs_type="etcd"), ("dcs-type",)),
    "dcs-type-empty": (yaml_of(dcs_type=""), ("dcs-type",)),
    "dcs-type-number": (yaml_of(dcs_type=5), ("dcs-type",)),
    "dcs-type-list": (yaml_of(dcs_type=["consul"]), ("dcs-type",)),
    "dcs-endpoints-empty-list": (yaml_of(dcs_endpoints=[]), ("dcs-endpoints",)),
    "dcs-endpoints-empty-string": (yaml_of(dcs_endpoints=""), ("dcs-endpoints",)),
    "dcs-endpoints-mapping": (yaml_of(dcs_endpoints={"a": 1}), ("dcs-endpoints",)),
    "trigger-key-missing": (yaml_of(trigger_key=...), ("trigger-key",)),
    "trigger-key-empty": (yaml_of(trigger_key=""), ("trigger-key",)),
    "trigger-key-slash-only": (yaml_of(trigger_key="/"), ("trigger-key",)),
    "trigger-key-list": (yaml_of(trigger_key=["a", "b"]), ("trigger-key",)),
    "trigger-key-null": ("dcs-type: consul\ntrigger-key:\n", ("trigger-key",)),
    "env-dcs-type-etcd": ("VIP_DCS_TYPE=etcd\nVIP_TRIGGER_KEY=service/x/leader\n", ("VIP_DCS_TYPE",)),
    "env-no-type": ("VIP_TRIGGER_KEY=service/x/leader\nVIP_TRIGGER_VALUE=a\n", ("VIP_DCS_TYPE",)),
    "env-no-key": ("VIP_DCS_TYPE=consul\nVIP_TRIGGER_VALUE=a\n", ("VIP_TRIGGER_KEY",)),
    "env-legacy-no-key": ("VIP_TYPE=consul\nVIP_HOST=a\n", (("VIP_KEY", "VIP_TRIGGER_KEY"),)),
    "env-empty-endpoints": ("VIP_DCS_TYPE=consul\nVIP_TRIGGER_KEY=k\nVIP_DCS_ENDPOINTS=\n", ("VIP_DCS_ENDPOINTS",)),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_config_file(case, tmp_path, untouched):
    content, names = BAD_FILES[case]
    # env-file cases get the name of Debian's /etc/default/vip-manager
    path = tmp_path / ("vip-manager" if case.startswith("env-") else "vip-manager.yml")
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    # Point the environment at the live agent, so a daemon that went on would write.
    r = run_elector(["--vip-manager-config", str(path), "--hostname", "bad-" + case],
                    env={"CONSUL_HTTP_ADDR": untouched.http_addr})
    assert_config_error(r, str(path), *names)


def test_config_is_a_directory(tmp_path, untouched):
    r = run_elector(["--vip-manager-config", str(tmp_path), "--hostname", "bad-dir"],
                    env={"CONSUL_HTTP_ADDR": untouched.http_addr})
    assert_config_error(r, str(tmp_path))


def test_config_unreadable_for_the_service_user(tmp_path, untouched):
    path = tmp_path / "vip-manager.yml"
    path.write_text(yaml_of(dcs_endpoints=[untouched.url]))
    path.chmod(0o600)
    os.chmod(tmp_path, 0o755)
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    wrapper = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    probe = subprocess.run(wrapper + [PYTHON, "-c", "import vip_elector.cli"], cwd="/",
                           env=elector_env(), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("user nobody cannot import vip_elector from %s: %s" % (REPO, probe.stderr.strip()[-200:]))
    r = subprocess.run(wrapper + [PYTHON, "-m", "vip_elector", "--vip-manager-config", str(path),
                                  "--hostname", "bad-perm"],
                       cwd="/", env=elector_env(), capture_output=True, text=True, timeout=30)
    assert_config_error(r, str(path))


# ---------------------------------------------------------------- bad flags

def good_config(tmp_path, agent, key="service/flags/leader"):
    path = tmp_path / "good.yml"
    path.write_text(yaml.safe_dump({"dcs-type": "consul", "dcs-endpoints": [agent.url], "trigger-key": key}))
    return str(path)


BAD_FLAGS = {
    # id: (extra args, exit codes allowed, words the last line must name)
    "ttl-too-short": (["--ttl", "5s"], 78, ("--ttl",)),
    "ttl-too-long": (["--ttl", "25h"], 78, ("--ttl",)),
    "ttl-zero": (["--ttl", "0"], 78, ("--ttl",)),
    "ttl-negative": (["--ttl=-10s"], 78, ("--ttl",)),
    "ttl-garbage": (["--ttl", "ten"], {2, 78}, ("--ttl",)),
    "ttl-bad-unit": (["--ttl", "10x"], {2, 78}, ("--ttl",)),
    "ttl-empty": (["--ttl="], {2, 78}, ("--ttl",)),
    "lock-delay-negative": (["--lock-delay=-1s"], 78, ("--lock-delay",)),
    "lock-delay-garbage": (["--lock-delay", "soon"], {2, 78}, ("--lock-delay",)),
    "token-file-missing": (["--token-file", "/nonexistent/vip-token"], 78, ("/nonexistent/vip-token",)),
    "unknown-flag": (["--bogus"], 2, ("--bogus",)),
    "unknown-flag-value": (["--bogus=1"], 2, ("--bogus",)),
    "ttl-without-value": (["--ttl"], 2, ("--ttl",)),
    "positional": (["extra"], 2, ("extra",)),
    "hostname-empty": (["--hostname="], {2, 78}, ("--hostname",)),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag(case, tmp_path, untouched):
    extra, codes, names = BAD_FLAGS[case]
    args = ["--vip-manager-config", good_config(tmp_path, untouched, "service/bad-flag-%s/leader" % case)]
    if case != "hostname-empty":
        args += ["--hostname", "bad-" + case]
    r = run_elector(args + extra)
    assert_config_error(r, *names, code=codes)


def test_token_file_empty(tmp_path, untouched):
    token = tmp_path / "token"
    token.write_text("\n")
    r = run_elector(["--vip-manager-config", good_config(tmp_path, untouched), "--hostname", "bad-token",
                     "--token-file", str(token)])
    assert_config_error(r, str(token))


def test_missing_vip_manager_config_flag(untouched):
    r = run_elector(["--hostname", "bad-noconf"], env={"CONSUL_HTTP_ADDR": untouched.http_addr})
    assert_config_error(r, "--vip-manager-config", code={2, 78})


# ------------------------------------------------------------ good variants

def wait_value(agent, key, value, timeout=30):
    return wait_for(lambda: (agent.holder(key) or (None,))[0] == value, timeout,
                    message="%s to hold %s" % (value, key))


def stop_all(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        assert p.wait(10) == 0, p.log()


def test_flag_forms_durations_and_defaults(consul, tmp_path, electors, write_config):
    k = "service/flagforms-%d" % os.getpid()
    runs = {
        "eq": (["--vip-manager-config=" + write_config(consul.http_addr, k + "-eq/leader"),
                "--hostname=eq-node", "--ttl=1m30s", "--lock-delay=2s"], 90, 2),
        "space": (["--vip-manager-config", write_config(consul.http_addr, k + "-space/leader"),
                   "--hostname", "space-node", "--ttl", "20", "--lock-delay", "500ms"], 20, 0.5),
        "defaults": (["--vip-manager-config", write_config(None, k + "-defaults/leader"),
                      "--addr", consul.http_addr, "--hostname", "def-node"], 10, 1),
    }
    procs = {name: electors(args, name=name) for name, (args, _, _) in runs.items()}
    for name, (args, ttl, delay) in runs.items():
        node = [a.split("=", 1)[1] if "=" in a else args[i + 1]
                for i, a in enumerate(args) if a.startswith("--hostname")][0]
        wait_value(consul, k + "-%s/leader" % name, node)
        session = consul.holder(k + "-%s/leader" % name)[1]
        assert go_duration(session["TTL"]) == ttl, (name, session)
        assert session["LockDelay"] == int(delay * 1e9), (name, session)
    stop_all(procs.values())


def test_env_file_new_and_legacy_names(consul, tmp_path, electors):
    k = "service/envfile-%d" % os.getpid()
    new = tmp_path / "vip-manager.new"
    new.write_text("# /etc/default/vip-manager\n"
                   "VIP_IP=10.0.0.10\nVIP_MASK=24\nVIP_IFACE=eth0\n"
                   "VIP_DCS_TYPE=consul\n"
                   "VIP_DCS_ENDPOINTS=http://%s,http://127.0.0.1:1\n"
                   "VIP_TRIGGER_KEY=/%s-new/leader\n"
                   "VIP_TRIGGER_VALUE=env-new-node\n" % (consul.http_addr, k))
    legacy = tmp_path / "vip-manager.legacy"
    legacy.write_text("VIP_IP=10.0.0.11\nVIP_TYPE=consul\nVIP_ENDPOINT=http://%s\n"
                      "VIP_KEY=%s-legacy/leader\nVIP_HOST=env-legacy-node\n" % (consul.http_addr, k))
    procs = [electors(["--vip-manager-config", str(new)], name="new"),
             electors(["--vip-manager-config", str(legacy)], name="legacy")]
    wait_value(consul, k + "-new/leader", "env-new-node")
    wait_value(consul, k + "-legacy/leader", "env-legacy-node")
    stop_all(procs)


def test_env_file_quoted_values(consul, tmp_path, electors):
    """systemd EnvironmentFile= syntax: quotes around values are not part of them."""
    k = "service/envquoted-%d" % os.getpid()
    f = tmp_path / "vip-manager.env"
    f.write_text('VIP_DCS_TYPE="consul"\nVIP_DCS_ENDPOINTS="http://%s"\n'
                 "VIP_TRIGGER_KEY='%s/leader'\nVIP_TRIGGER_VALUE=\"quoted-node\"\n" % (consul.http_addr, k))
    p = electors(["--vip-manager-config", str(f)], name="quoted")
    wait_value(consul, k + "/leader", "quoted-node")
    stop_all([p])


def test_yaml_endpoint_first_entry_is_used(consul, tmp_path, electors, write_config):
    k = "service/endpoints-%d/leader" % os.getpid()
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump({"dcs-type": "consul", "trigger-key": k,
                                    "dcs-endpoints": [consul.url, "http://127.0.0.1:1"]}))
    p = electors(["--vip-manager-config", str(path), "--hostname", "first-ep"], name="first-ep")
    wait_value(consul, k, "first-ep")
    stop_all([p])


# ------------------------------------------------------------------- --check

def test_check_mode_ok_and_takes_no_leadership(consul, tmp_path, write_config, check_id, untouched):
    consul.register_ttl_check(check_id)
    try:
        k = "service/checkmode-%s/leader" % check_id
        config = write_config(consul.http_addr, k)
        # Another node holds the key: that is fine for --check.
        other = consul.create_session(name="someone-else")
        assert consul.acquire(k, other, b"node-x") is True
        untouched_kv = consul.kv_all()
        t0 = time.monotonic()
        r = run_elector(["--vip-manager-config", config, "--check-id", check_id, "--hostname", "chk",
                         "--check"], timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (r.stdout + r.stderr).strip(), "--check prints a report"
        assert check_id in r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        assert time.monotonic() - t0 < 30
        assert consul.kv_all() == untouched_kv
        consul.destroy_session(other)
        consul.kv_delete(k)
    finally:
        consul.deregister_check(check_id)


@pytest.mark.parametrize("problem", ["check-missing", "check-critical", "consul-unreachable", "plain-key"])
def test_check_mode_reports_problems(problem, consul, tmp_path, write_config, check_id):
    k = "service/checkprob-%s-%s/leader" % (problem, check_id)
    addr = consul.http_addr
    if problem == "check-critical":
        consul.register_ttl_check(check_id, status="critical")
    elif problem == "check-missing":
        pass
    else:
        consul.register_ttl_check(check_id)
    if problem == "consul-unreachable":
        addr = "127.0.0.1:1"
    if problem == "plain-key":
        consul.kv_put(k, "other", flags=0)
    before = consul.kv_all()
    try:
        r = run_elector(["--vip-manager-config", write_config(addr, k), "--check-id", check_id,
                         "--hostname", "chk", "--check"], timeout=60)
        assert r.returncode != 0, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        out = r.stdout + r.stderr
        if problem.startswith("check"):
            assert check_id in out
        if problem == "plain-key":
            assert k in out
        assert consul.kv_all() == before
        assert not sessions_named(consul, "vip-elector-chk")
    finally:
        if problem != "check-missing":
            consul.deregister_check(check_id)
        if problem == "plain-key":
            consul.kv_delete(k)


# -------------------------------------------------------------- properties

garbage_bytes = st.binary(min_size=0, max_size=200)
garbage_text = st.text(alphabet=string.printable + "äé€\x00", max_size=200)
not_consul = st.one_of(st.none(), st.integers(), st.booleans(), st.floats(allow_nan=False),
                       st.text(max_size=10).filter(lambda s: s.strip().lower() != "consul"),
                       st.lists(st.text(max_size=5), max_size=3))
any_value = st.one_of(st.none(), st.integers(), st.booleans(), st.text(max_size=20),
                      st.lists(st.text(max_size=10), max_size=3),
                      st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
bad_mapping = st.fixed_dictionaries(
    {"dcs-type": not_consul},
    optional={"dcs-endpoints": any_value, "trigger-key": any_value, "trigger-value": any_value,
              "consul-token": any_value}).map(lambda d: yaml.safe_dump(d).encode())
bad_key_mapping = st.fixed_dictionaries(
    {"dcs-type": st.just("consul"),
     # (not numbers: vip-manager itself would read trigger-key 5 as "5")
     "trigger-key": st.one_of(st.none(), st.just(""), st.just("/"),
                              st.lists(st.text(max_size=5), max_size=2))},
    optional={"dcs-endpoints": st.just([]), "trigger-value": any_value}).map(lambda d: yaml.safe_dump(d).encode())


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=st.one_of(garbage_bytes, garbage_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
                         bad_mapping, bad_key_mapping))
def test_garbage_config_never_tracebacks(content, tmp_path_factory, consul):
    path = tmp_path_factory.mktemp("garbage") / "vip-manager.yml"
    path.write_bytes(content)
    r = run_elector(["--vip-manager-config", str(path), "--hostname", "garbage-node"],
                    env={"CONSUL_HTTP_ADDR": consul.http_addr}, timeout=30)
    assert r.returncode == 78, (content, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(stderr_lines(r)) == 1, r.stderr
    assert str(path) in r.stderr
