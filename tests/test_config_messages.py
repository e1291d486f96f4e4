"""What a user reads when vip-manager's configuration is wrong (issue 10, points 6 and 7).

Fast: no Consul. Each message names the file (and the line when there is
one), gives PyYAML's own reason for a YAML error, speaks the file's own
form (VIP_* names for an environment file), and never shows a Python type
name or a traceback.
"""

import re

import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from vip_elector.config import ConfigError, Options, build_settings

#: Python's words that must never reach a user.
TYPE_NAMES = re.compile(r"\b(str|dict|list|NoneType|int|float|bool|bytes|tuple|Traceback)\b")


def message_for(tmp_path, text, name="vip-manager.yml"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        build_settings(Options(vip_manager_config=str(path)), {}, kernel_hostname="node-a")
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message
    assert not TYPE_NAMES.search(message), message
    return message


def test_yaml_error_gives_pyyamls_problem_and_the_line_of_the_mistake(tmp_path):
    # Line 3 lacks its colon; PyYAML notices on line 5 (after a blank and a comment line).
    text = "dcs-type: consul\ndcs-endpoints: ['http://127.0.0.1:8500']\ntrigger-key service/pg/leader\n" \
           "\n# the interval\ninterval: 1000\n"
    m = message_for(tmp_path, text)
    assert "could not find expected ':'" in m
    assert "fix line 3" in m
    assert "environment" not in m and "VIP_" not in m, "no env-file advice for a YAML file"


@pytest.mark.parametrize("text, problem, line", [
    ("dcs-type: consul\ntrigger-key: [a, b\ninterval: 3\n", "expected ',' or ']'", 2),
    ("dcs-type: consul\n\ttrigger-key: x\n", "cannot start any token", 2),
    ("dcs-type: consul\ntrigger-key: 'x\ninterval: 3\n", "unexpected end of stream", 2),
    ("dcs-type: consul\n trigger-key: x\n", "mapping values are not allowed here", 2),
    ("dcs-type: consul\ninterval = 1000\nip: 1\n", "could not find expected ':'", 2),
])
def test_yaml_errors(tmp_path, text, problem, line):
    m = message_for(tmp_path, text)
    assert problem in m and "fix line %d" % line in m, m
    assert "VIP_" not in m


def test_comments_only_env_file_sets_nothing_and_names_the_variables(tmp_path):
    # Debian's untouched /etc/default/vip-manager is all comments.
    text = "# Defaults for vip-manager\n#VIP_IP=\n#VIP_MASK=\n#VIP_KEY=\n#VIP_HOST=\n"
    m = message_for(tmp_path, text, name="vip-manager")
    assert "sets nothing" in m and "empty" not in m
    assert "VIP_DCS_TYPE" in m and "VIP_TRIGGER_KEY" in m
    assert "dcs-type:" not in m


def test_empty_and_comment_files_name_both_forms(tmp_path):
    for text in ("", "\n  \n", "# just a comment\n"):
        m = message_for(tmp_path, text)
        assert "VIP_DCS_TYPE" in m and "VIP_TRIGGER_KEY" in m and "trigger-key" in m


@pytest.mark.parametrize("text, line", [
    ("VIP_TRIGGER_KEY = service/pg/leader\n", 1),
    ("VIP_DCS_TYPE=consul\nVIP_TRIGGER_KEY = service/pg/leader\n", 2),
    ("# c\nVIP_DCS_TYPE=consul\n\nexport VIP_TRIGGER_KEY =x\n", 4),
])
def test_spaces_around_equals_name_the_line(tmp_path, text, line):
    m = message_for(tmp_path, text, name="vip-manager")
    assert "line %d" % line in m and "remove the spaces" in m and "VIP_" in m, m


def test_env_file_with_a_stray_line_names_it(tmp_path):
    m = message_for(tmp_path, "VIP_DCS_TYPE=consul\nVIP_TRIGGER_KEY=k\nVIP_IP 10.0.0.1\n", name="vip-manager")
    assert "line 3" in m and "NAME=value" in m


BROKEN = [
    "- dcs-type: consul\n", "just words\n", "42\n", "3.5\n", "true\n", "~\n", "[a, b]\n",
    "dcs-type: [consul]\ntrigger-key: k\n", "dcs-type: {a: 1}\ntrigger-key: k\n",
    "dcs-type: consul\ntrigger-key: [a]\n", "dcs-type: consul\ntrigger-key: {a: b}\n",
    "dcs-type: consul\ntrigger-key: k\ntrigger-value: [a]\n",
    "dcs-type: consul\ntrigger-key: k\nconsul-token: {a: 1}\n",
    "dcs-type: consul\ntrigger-key: k\ndcs-endpoints: 5\n",
    "dcs-type: consul\ntrigger-key: k\ndcs-endpoints: {a: 1}\n",
    "dcs-type: consul\ntrigger-key: k\ndcs-endpoints: []\n",
    "dcs-type: 5\ntrigger-key: k\n", "dcs-type: null\ntrigger-key: k\n", "trigger-key: k\n",
    "dcs-type: consul\n", "dcs-type: consul\ntrigger-key: /\n", "dcs-type: consul\ntrigger-key: a/\n",
    "VIP_TRIGGER_KEY = x\n", "VIP_DCS_TYPE=etcd\nVIP_TRIGGER_KEY=k\n", "VIP_DCS_TYPE=consul\n",
    "VIP_DCS_TYPE=consul\nVIP_TRIGGER_KEY=k\nVIP_DCS_ENDPOINTS=\n",
    "VIP_DCS_TYPE=consul\nVIP_TRIGGER_KEY=k\nVIP_DCS_ENDPOINTS=ftp://x\n",
    "dcs-type: consul\ntrigger-key: k\ndcs-endpoints: ['x:99999']\n",
    "a: b: c\n", "key: @x\n", "\x00\x01", b"\xff\xfe\x00",
]


@pytest.mark.parametrize("text", BROKEN)
def test_no_python_type_names_in_any_message(tmp_path, text):
    message_for(tmp_path, text)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["dcs-type", "dcs-endpoints", "trigger-key", "trigger-value",
                                        "consul-token"]),
                       st.one_of(st.none(), st.text(max_size=8), st.integers(), st.booleans(),
                                 st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
                                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))))
def test_no_python_type_names_for_any_shape(tmp_path, data):
    path = tmp_path / "shaped.yml"
    path.write_text(yaml.safe_dump(data))
    try:
        build_settings(Options(vip_manager_config=str(path)), {}, kernel_hostname="node-a")
    except ConfigError as e:
        assert not TYPE_NAMES.search(str(e)), str(e)
