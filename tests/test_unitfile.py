"""`--check-service` reads the unit as systemd does (issue 19, item 5): pure, fast.

systemd's EnvironmentFile= grammar (continuation lines, quotes, comments),
the unit with its drop-ins (from `systemctl show`, or from the files when
systemd does not run), ExecStart='s $VAR expansion, and the paths the unit's
sandbox hides from the daemon. The booted proof is in
tests/test_operator_container.py.
"""

import os

import pytest

from vip_elector import service, unitfile
from vip_elector.unitfile import UnitView, parse_environment_file

# The source tree (debian/rules sets it for the package build, whose build directory has no systemd/).
REPO = os.environ.get("VIP_ELECTOR_SOURCE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shipped(name):
    with open(os.path.join(REPO, "systemd", name), encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------ EnvironmentFile=

def test_a_backslash_newline_continues_the_line_as_systemd_does():
    """The form the man page's EXAMPLES write: the option list over two lines."""
    text = ('VIP_ELECTOR_OPTS="--vip-manager-config=/etc/vip-manager.yml \\\n'
            '    --check-id=vip-haproxy"\n'
            'CONSUL_HTTP_TOKEN=abc\n')
    env = parse_environment_file(text)
    assert env["VIP_ELECTOR_OPTS"].split() == ["--vip-manager-config=/etc/vip-manager.yml",
                                               "--check-id=vip-haproxy"]
    assert env["CONSUL_HTTP_TOKEN"] == "abc"
    unquoted = parse_environment_file("VIP_ELECTOR_OPTS=--vip-manager-config=/a \\\n --ttl=15s\n")
    assert unquoted["VIP_ELECTOR_OPTS"].split() == ["--vip-manager-config=/a", "--ttl=15s"]


@pytest.mark.parametrize("text, expected", [
    ("A=1\nB = 2 \n", {"A": "1", "B": "2"}),                         # whitespace around
    ("A='x y'\nB=\"p\\\"q\"\n", {"A": "x y", "B": 'p"q'}),             # quotes, an escaped quote
    ('A="one\ntwo"\n', {"A": "one\ntwo"}),                           # a quoted value spans lines
    ("# A=1\n; B=2\nC=3 # not a comment\n", {"C": "3 # not a comment"}),
    ("A=\nB\nC=x", {"A": "", "C": "x"}),                             # empty, no "=", no newline at end
    ('A="a\\nb"\n', {"A": "a\\nb"}),                                 # other escapes kept as written
    ("1A=x\nA-B=y\n_OK=z\n", {"_OK": "z"}),                          # invalid names dropped
    ("A=1\nA=2\n", {"A": "2"}),
    ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
])
def test_environment_file_grammar(text, expected):
    assert parse_environment_file(text) == expected


def test_a_comment_ending_in_a_backslash_before_and_since_systemd_254():
    text = "# note \\\nA=1\nB=2\n"
    assert parse_environment_file(text, comment_continues=True) == {"B": "2"}     # bookworm's 252
    assert parse_environment_file(text, comment_continues=False) == {"A": "1", "B": "2"}


def test_the_shipped_defaults_file_sets_nothing():
    with open(os.path.join(REPO, "debian", "vip-elector.default"), encoding="utf-8") as f:
        text = f.read()
    assert parse_environment_file(text, True) == parse_environment_file(text, False) == {}


# ------------------------------------------------------------- ExecStart=

def test_exec_start_expansion():
    env = {"VIP_ELECTOR_OPTS": "--a=1   --b 2", "X": "p q"}
    assert unitfile.expand_exec(["/usr/bin/vip-elector", "$VIP_ELECTOR_OPTS", "${X}", "$$Y"], env) == \
        ["/usr/bin/vip-elector", "--a=1", "--b", "2", "p q", "$Y"]
    assert unitfile.expand_exec(["$UNSET"], {}) == []
    view = UnitView("u", "t", exec_start=["-/usr/bin/vip-elector", "$VIP_ELECTOR_OPTS"])
    assert unitfile.daemon_options(view, env) == ["--a=1", "--b", "2"]
    assert unitfile.daemon_options(UnitView("u", "t", exec_start=["/bin/true"]), env) is None


# ------------------------------------------------------- from systemd itself

#: `systemctl show vip-elector@web.service -p ...` of systemd 252 (bookworm),
#: with a drop-in that adds an environment file and replaces ExecStart=.
SHOW = """\
ExecStart={ path=/usr/bin/vip-elector ; argv[]=/usr/bin/vip-elector $VIP_ELECTOR_OPTS --ttl=15s ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }
Environment=VIP_ELECTOR_INSTANCE=web "VIP_ELECTOR_OPTS=--vip-manager-config=/etc/a.yml --hook /tmp/h" "Q=x\\"y"
EnvironmentFiles=/etc/default/vip-elector-web (ignore_errors=yes)
EnvironmentFiles=/etc/vip-elector/more (ignore_errors=no)
User=vip-elector
PrivateTmp=yes
ProtectHome=read-only
ProtectSystem=strict
ReadWritePaths=-/var/lib/vip
RuntimeDirectory=vip-elector-web
LoadState=loaded
"""


def test_systemctl_show_is_read_as_systemd_means_it():
    view = unitfile.parse_show("vip-elector@web.service", SHOW)
    assert view.exec_start == ["/usr/bin/vip-elector", "$VIP_ELECTOR_OPTS", "--ttl=15s"]
    assert view.environment == {"VIP_ELECTOR_INSTANCE": "web", "Q": 'x"y',
                                "VIP_ELECTOR_OPTS": "--vip-manager-config=/etc/a.yml --hook /tmp/h"}
    assert view.environment_files == [("/etc/default/vip-elector-web", True), ("/etc/vip-elector/more", False)]
    assert (view.protect_home, view.private_tmp, view.protect_system) == ("read-only", True, "strict")
    assert view.read_write_paths == ("/var/lib/vip",) and view.runtime_directories == ("vip-elector-web",)
    assert unitfile.parse_show("x.service", "LoadState=not-found\nEnvironment=\n") is None


def test_from_systemd_asks_systemctl_show_for_the_effective_unit():
    calls = []

    class Done:
        returncode, stdout = 0, SHOW

    def run(argv, **kw):
        calls.append(argv)
        return Done()
    view = unitfile.from_systemd("vip-elector@web.service", run=run)
    assert calls[0][:3] == ["systemctl", "show", "vip-elector@web.service"]
    assert {"ExecStart", "Environment", "EnvironmentFiles"} <= set(calls[0][-1].split(","))
    assert view and view.source.startswith("systemd")


# ------------------------------------------------------- from the unit files

def lay_out(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_unit_files_and_drop_ins_in_systemds_order(tmp_path):
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    lay_out(lib, {"vip-elector@.service": shipped("vip-elector@.service"),
                  "vip-elector@.service.d/10-a.conf": "[Service]\nEnvironment=A=lib\n",
                  "vip-elector@.service.d/20-b.conf": "[Service]\nEnvironment=B=lib\n"})
    lay_out(etc, {"vip-elector@.service.d/10-a.conf": "[Service]\nEnvironment=A=etc\n",
                  "vip-elector@web.service.d/30-c.conf": "[Service]\nProtectHome=no\n",
                  "service.d/05-all.conf": "[Service]\nEnvironment=ALL=1\n"})
    files = unitfile.unit_files("vip-elector@web.service", roots=(str(etc), str(lib)))
    assert [os.path.relpath(f, tmp_path) for f in files] == [
        "lib/vip-elector@.service", "etc/service.d/05-all.conf", "etc/vip-elector@.service.d/10-a.conf",
        "lib/vip-elector@.service.d/20-b.conf", "etc/vip-elector@web.service.d/30-c.conf"]
    view = unitfile.from_files("vip-elector@web.service", roots=(str(etc), str(lib)))
    assert view.environment == {"VIP_ELECTOR_INSTANCE": "web", "ALL": "1", "A": "etc", "B": "lib"}
    assert view.protect_home == "no"
    assert unitfile.unit_files("nothing.service", roots=(str(etc),)) == []


def test_the_shipped_template_unit_read_from_its_file():
    view = unitfile.parse_unit_texts("vip-elector@web.service", [shipped("vip-elector@.service")])
    assert view.exec_start == ["/usr/bin/vip-elector", "$VIP_ELECTOR_OPTS"]
    assert view.environment_files == [("/etc/default/vip-elector-web", True)]
    assert view.environment == {"VIP_ELECTOR_INSTANCE": "web"}
    assert (view.protect_home, view.private_tmp, view.protect_system) == ("yes", True, "strict")
    assert view.runtime_directories == ("vip-elector-web",)


def test_a_drop_in_can_set_the_options_and_reset_the_command(tmp_path):
    """What the package tests do: VIP_ELECTOR_OPTS from a drop-in, the
    defaults file setting nothing (the old --check-service saw no options)."""
    defaults = tmp_path / "vip-elector"
    defaults.write_text("# nothing\nCONSUL_HTTP_TOKEN=t\n")
    plain = shipped("vip-elector.service").replace("/etc/default/vip-elector", str(defaults))
    dropin = '[Service]\nEnvironment="VIP_ELECTOR_OPTS=--vip-manager-config=/etc/vip-manager.yml --ttl=15s"\n'
    view = unitfile.parse_unit_texts("vip-elector.service", [plain, dropin])
    env, opts = service.service_command(view)
    assert opts == ["--vip-manager-config=/etc/vip-manager.yml", "--ttl=15s"]
    assert env["CONSUL_HTTP_TOKEN"] == "t"
    reset = view_with("[Service]\nExecStart=\nExecStart=/usr/bin/vip-elector --vip-manager-config=/x\n", plain)
    assert service.service_command(reset)[1] == ["--vip-manager-config=/x"]


def view_with(dropin, unit_text):
    return unitfile.parse_unit_texts("vip-elector.service", [unit_text, dropin])


def test_the_defaults_file_overrides_environment_and_continues_lines(tmp_path):
    defaults = tmp_path / "vip-elector"
    defaults.write_text('VIP_ELECTOR_OPTS="--vip-manager-config=/etc/vip-manager.yml \\\n    --check-id=vip-haproxy"\n')
    plain = shipped("vip-elector.service").replace("/etc/default/vip-elector", str(defaults))
    view = view_with('[Service]\nEnvironment="VIP_ELECTOR_OPTS=--vip-manager-config=/overridden"\n', plain)
    assert service.service_command(view)[1] == ["--vip-manager-config=/etc/vip-manager.yml",
                                                "--check-id=vip-haproxy"]


def test_a_missing_required_environment_file_is_systemds_refusal(tmp_path):
    view = UnitView("vip-elector.service", "t", exec_start=["/usr/bin/vip-elector"],
                    environment_files=[(str(tmp_path / "absent"), False)])
    with pytest.raises(service.ServiceError) as raised:
        service.service_command(view)
    assert "does not exist, so systemd would not start vip-elector.service" in str(raised.value)
    optional = UnitView("vip-elector.service", "t", exec_start=["/usr/bin/vip-elector"],
                        environment_files=[(str(tmp_path / "absent"), True)])
    assert service.service_command(optional) == ({}, [])
    wrapped = UnitView("vip-elector.service", "t", exec_start=["/bin/sleep", "1"])
    with pytest.raises(service.ServiceError) as raised:
        service.service_command(wrapped)
    assert "does not run vip-elector" in str(raised.value) and "systemctl cat" in str(raised.value)


# ------------------------------------------------------------------ sandbox

SHIPPED = unitfile.parse_unit_texts("vip-elector.service", [shipped("vip-elector.service")])


@pytest.mark.parametrize("opts, env, hidden", [
    (["--hook=/home/ops/hook"], {}, "--hook /home/ops/hook: ProtectHome=yes in vip-elector.service hides /home"),
    (["--hook", "/root/hook"], {}, "ProtectHome=yes"),
    (["--token-file=/tmp/token"], {}, "--token-file /tmp/token: PrivateTmp=yes in vip-elector.service "
                                      "gives it its own empty /tmp"),
    (["--vip-manager-config=/var/tmp/v.yml"], {}, "own empty /var/tmp"),
    (["--state-dir=/var/lib/vip-elector"], {}, "ProtectSystem=strict in vip-elector.service makes it read-only"),
    ([], {"CONSUL_CACERT": "/run/user/0/ca.pem"}, "CONSUL_CACERT /run/user/0/ca.pem"),
    (["--vip-manager-config=/etc/vip-manager.yml", "--hook=/usr/local/sbin/vip-elector-fence",
      "--state-dir=/run/vip-elector", "--token-file=/etc/vip-elector/token"], {}, None),
])
def test_paths_the_shipped_sandbox_hides(opts, env, hidden):
    problems = service.sandbox_problems(opts, env, SHIPPED)
    if hidden is None:
        assert problems == []
    else:
        assert len(problems) == 1 and hidden in problems[0], problems
        assert "so the service cannot" in problems[0]


def test_a_drop_in_that_opens_the_sandbox_is_honoured():
    opened = view_with("[Service]\nProtectHome=read-only\nPrivateTmp=no\nReadWritePaths=/var/lib/vip\n",
                       shipped("vip-elector.service"))
    assert service.sandbox_problems(["--hook=/home/ops/hook", "--token-file=/tmp/t",
                                     "--state-dir=/var/lib/vip"], {}, opened) == []
    problems = service.sandbox_problems(["--state-dir=/home/ops/state"], {}, opened)
    assert problems and "ProtectHome=read-only" in problems[0], problems
