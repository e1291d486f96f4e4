"""Configuration: vip-manager's two file forms, SPEC §3's precedence, durations, errors."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from vip_elector.config import (ConfigError, Options, build_settings, load_vip_manager_config,
                                normalise_key, parse_address, parse_duration)


def write(tmp_path, text, name="vip-manager.yml", mode=None):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    if mode is not None:
        p.chmod(mode)
    return str(p)


YAML = """\
dcs-type: consul
dcs-endpoints: ["http://10.0.0.5:8500", "http://10.0.0.6:8500"]
trigger-key: /service/pg/leader
trigger-value: pg-1
consul-token: from-file
ip: 10.0.0.100
netmask: 24
interface: eth0
"""


def build(path, env=None, kernel="db1.example.org", **kw):
    return build_settings(Options(vip_manager_config=path, **kw), env or {}, kernel_hostname=kernel)


# --- durations ---------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("10s", 10), ("500ms", 0.5), ("1m30s", 90), ("1h", 3600), ("2", 2), ("1.5s", 1.5),
    ("0", 0), ("24h", 86400), ("1h0m0s", 3600), ("250us", 0.00025),
])
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10x", "ten", "1m 30s", "-", "1s2"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.text(max_size=12))
def test_duration_parser_answers_a_float_or_valueerror(text):
    """Whatever the text: a float, or a ValueError (which the flag parser turns into
    a usage error), never another exception. Ranges are the callers' (--ttl nan is
    "out of Consul's range")."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert isinstance(seconds, float), repr(seconds)


GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@given(st.lists(st.tuples(st.integers(0, 999), st.sampled_from(sorted(GO_UNITS))), min_size=1, max_size=4))
def test_any_go_duration_is_the_sum_of_its_parts(parts):
    text = "".join("%d%s" % part for part in parts)
    assert parse_duration(text) == pytest.approx(sum(n * GO_UNITS[unit] for n, unit in parts)), text


# --- the file forms ----------------------------------------------------------

def test_yaml_form(tmp_path):
    s = build(write(tmp_path, YAML))
    assert (s.trigger_key, s.value, s.host, s.port, s.scheme) == ("service/pg/leader", "pg-1", "10.0.0.5", 8500, "http")
    assert s.token == "from-file" and s.token_source.endswith("consul-token")
    assert s.checks == ["serfHealth"]


def test_env_file_form_new_names(tmp_path):
    path = write(tmp_path, """# /etc/default/vip-manager
VIP_IP=10.0.0.100
VIP_DCS_TYPE=consul
VIP_DCS_ENDPOINTS="http://127.0.0.2:8500,http://127.0.0.3:8500"
VIP_TRIGGER_KEY='/service/x/leader'
VIP_TRIGGER_VALUE=pg-2
VIP_CONSUL_TOKEN=tok
""", name="vip-manager")
    s = build(path)
    assert (s.trigger_key, s.value, s.host, s.token) == ("service/x/leader", "pg-2", "127.0.0.2", "tok")


def test_env_file_form_legacy_names(tmp_path):
    path = write(tmp_path, "VIP_TYPE=consul\nVIP_ENDPOINT=127.0.0.4:8501\nVIP_KEY=/k\nVIP_HOST=h\n",
                 name="vip-manager")
    s = build(path)
    assert (s.trigger_key, s.value, s.host, s.port) == ("k", "h", "127.0.0.4", 8501)


def test_new_env_names_win_over_legacy(tmp_path):
    path = write(tmp_path, "VIP_TYPE=etcd\nVIP_DCS_TYPE=consul\nVIP_KEY=old\nVIP_TRIGGER_KEY=new\n")
    assert build(path).trigger_key == "new"


# --- precedence (SPEC §3) ------------------------------------------------------

def test_address_precedence(tmp_path):
    with_endpoints = write(tmp_path, YAML)
    without = write(tmp_path, "dcs-type: consul\ntrigger-key: k\n", name="b.yml")
    env = {"CONSUL_HTTP_ADDR": "192.0.2.1:9999"}
    assert build(with_endpoints, env, addr="https://c.example:8443").address == "https://c.example:8443"
    assert build(with_endpoints, env).host == "10.0.0.5"
    assert build(without, env).host == "192.0.2.1"
    assert build(without).address == "127.0.0.1:8500"


def test_token_precedence(tmp_path):
    path = write(tmp_path, YAML)
    tf = write(tmp_path, "  file-token\n", name="token")
    etf = write(tmp_path, "env-file-token\n", name="token2")
    env = {"CONSUL_HTTP_TOKEN": "env-token", "CONSUL_HTTP_TOKEN_FILE": etf}
    assert build(path, env, token="flag", token_file=tf).token == "flag"
    assert build(path, env, token_file=tf).token == "file-token"
    assert build(path, env).token == "env-token"
    assert build(path, {"CONSUL_HTTP_TOKEN_FILE": etf}).token == "env-file-token"
    assert build(path).token == "from-file"


def test_token_never_in_repr(tmp_path):
    s = build(write(tmp_path, YAML), token="s3cret")
    assert "s3cret" not in repr(s)


def test_value_precedence_and_hostname_warning(tmp_path):
    path = write(tmp_path, "dcs-type: consul\ntrigger-key: k\n")
    s = build(path, kernel="db1.example.org")
    assert s.value == "db1"
    assert len(s.warnings) == 1 and "db1.example.org" in s.warnings[0] and "trigger-value" in s.warnings[0]
    assert build(path, kernel="db1").warnings == ()
    s = build_settings(Options(vip_manager_config=path, hostname="node-x"), {}, kernel_hostname="db1.example.org")
    assert s.value == "node-x" and s.warnings == ()
    assert build(write(tmp_path, YAML, name="c.yml")).value == "pg-1"


def test_leading_slashes_are_removed_like_the_go_client_does():
    assert normalise_key("/service/pg/leader") == "service/pg/leader"
    assert normalise_key("//a/b") == "a/b"


def test_tls_settings(tmp_path):
    ca = write(tmp_path, "-----BEGIN CERTIFICATE-----\n", name="ca.pem")
    crt, key = write(tmp_path, "x", name="c.pem"), write(tmp_path, "y", name="k.pem")
    path = write(tmp_path, YAML)
    env = {"CONSUL_CACERT": ca, "CONSUL_CLIENT_CERT": crt, "CONSUL_CLIENT_KEY": key}
    s = build(path, env, addr="https://consul.example")
    assert (s.scheme, s.port, s.tls.verify, s.tls.cert) == ("https", 8501, ca, (crt, key))
    assert build(path, {"CONSUL_HTTP_SSL_VERIFY": "false"}, addr="https://x:1").tls.verify is False
    with pytest.raises(ConfigError, match="CONSUL_CLIENT_KEY"):
        build(path, {"CONSUL_CLIENT_CERT": crt}, addr="https://x:1")


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:8500", ("http", "127.0.0.1", 8500)),
    ("http://consul:8500", ("http", "consul", 8500)),
    ("https://consul", ("https", "consul", 8501)),
    ("consul", ("http", "consul", 8500)),
    ("[::1]:8500", ("http", "::1", 8500)),
])
def test_addresses(text, expected):
    assert parse_address(text, "--addr") == expected


# --- errors: one sentence naming the file or flag ------------------------------

BAD_FILES = {
    "empty": "",
    "blank": "   \n\n",
    "not yaml": "dcs-type: [consul\n",
    "a list": "- dcs-type\n- consul\n",
    "a scalar": "just words\n",
    "no dcs-type": "trigger-key: k\n",
    "etcd": "dcs-type: etcd\ntrigger-key: k\n",
    "empty endpoints": "dcs-type: consul\ndcs-endpoints: []\ntrigger-key: k\n",
    "no trigger-key": "dcs-type: consul\n",
    "empty trigger-key": "dcs-type: consul\ntrigger-key: ''\n",
    "slash trigger-key": "dcs-type: consul\ntrigger-key: /\n",
    "folder trigger-key": "dcs-type: consul\ntrigger-key: a/b/\n",
    "nested trigger-key": "dcs-type: consul\ntrigger-key: {a: b}\n",
    "bad endpoint": "dcs-type: consul\ndcs-endpoints: ['ftp://x:1']\ntrigger-key: k\n",
    "bad endpoint port": "dcs-type: consul\ndcs-endpoints: ['x:99999']\ntrigger-key: k\n",
    "env etcd": "VIP_TYPE=etcd\nVIP_KEY=k\n",
    "env no key": "VIP_DCS_TYPE=consul\n",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_are_one_sentence_naming_the_file(tmp_path, name):
    path = write(tmp_path, BAD_FILES[name])
    with pytest.raises(ConfigError) as e:
        build(path)
    message = str(e.value)
    assert "\n" not in message and path in message


def test_binary_file(tmp_path):
    with pytest.raises(ConfigError, match="binary|UTF-8"):
        build(write(tmp_path, b"\x00\x01\xff\xfe" * 10))


def test_missing_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build(str(tmp_path / "nope.yml"))
    with pytest.raises(ConfigError, match="directory"):
        build(str(tmp_path))
    if os.geteuid() != 0:
        with pytest.raises(ConfigError, match="not readable"):
            build(write(tmp_path, YAML, mode=0))


@pytest.mark.parametrize("kw,flag", [
    ({"ttl": 5}, "--ttl"), ({"ttl": 86401}, "--ttl"), ({"lock_delay": -1}, "--lock-delay"),
    ({"lock_delay": 61}, "--lock-delay"), ({"token_file": "/nonexistent/token"}, "--token-file"),
    ({"check_id": " "}, "--check-id"), ({"hostname": ""}, "--hostname"), ({"addr": "a/b"}, "--addr"),
])
def test_bad_flags_name_the_flag(tmp_path, kw, flag):
    with pytest.raises(ConfigError, match=flag):
        build(write(tmp_path, YAML), **kw)


def test_empty_token_file(tmp_path):
    with pytest.raises(ConfigError, match="--token-file.*empty"):
        build(write(tmp_path, YAML), token_file=write(tmp_path, "\n", name="t"))


@hsettings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_garbage_files_give_config_errors_never_crashes(tmp_path, data):
    path = write(tmp_path, data, name="garbage")
    try:
        s = build(path)
    except ConfigError as e:
        assert "\n" not in str(e)
    else:  # garbage that happens to be a valid consul configuration
        assert s.trigger_key


@hsettings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["dcs-type", "dcs-endpoints", "trigger-key", "trigger-value",
                                        "consul-token", "ip"]),
                       st.one_of(st.none(), st.text(max_size=20), st.integers(), st.booleans(),
                                 st.lists(st.text(max_size=10), max_size=3),
                                 st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))))
def test_wrongly_shaped_yaml_gives_config_errors(tmp_path, data):
    import yaml
    path = write(tmp_path, yaml.safe_dump(data), name="shaped.yml")
    try:
        build(path)
    except ConfigError as e:
        assert "\n" not in str(e)


def test_vip_manager_reader_keeps_unrelated_settings_out(tmp_path):
    """Only the settings vip-elector uses are taken: the five of SPEC §3, and the VIP (§12, used
    only with --manage-vip)."""
    import dataclasses
    vm = load_vip_manager_config(write(tmp_path, YAML + "interval: 1000\nmanager-type: basic\n"))
    taken = {k: v for k, v in dataclasses.asdict(vm).items() if k not in ("path", "env_form", "sources")}
    assert taken == {"dcs_type": "consul", "endpoints": ["http://10.0.0.5:8500", "http://10.0.0.6:8500"],
                     "trigger_key": "/service/pg/leader", "trigger_value": "pg-1",
                     "consul_token": "from-file", "ip": "10.0.0.100", "netmask": "24", "interface": "eth0"}
    for unrelated in ("1000", "basic"):
        assert unrelated not in repr(vm), repr(vm)
