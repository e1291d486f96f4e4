"""The hook runner (SPEC §10.1–§10.3) with real shell-script hooks; no Consul needed.

Each hook records what it saw into files under tmp_path; the tests wait for
those records (polling with deadlines, never fixed sleeps) and read the
runner's log lines through a handler on the "vip_elector" logger.
"""

import logging
import os
import stat
import threading
import time

import pytest

from vip_elector.config import ConfigError
from vip_elector.hooks import KILL_AFTER, LEADER, MAX_LINE, MAX_LINES, STANDBY, Hooks, validate_hook

from helpers import no_internal_errors, wait_for

KEY, VALUE = "service/hooktest/leader", "node-a"


class LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self.guard = threading.Lock()

    def emit(self, record):
        with self.guard:
            self.records.append(record)

    def messages(self, level=logging.DEBUG):
        with self.guard:
            return [r.getMessage() for r in self.records if r.levelno >= level]

    def find(self, text, level=logging.DEBUG):
        return [m for m in self.messages(level) if text in m]

    def first(self, text):
        """The first record whose message holds text."""
        with self.guard:
            found = [r for r in self.records if text in r.getMessage()]
        assert found, "no log record with %r" % text
        return found[0]


@pytest.fixture
def hook_log():
    logger = logging.getLogger("vip_elector")
    handler = LogRecords()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    no_internal_errors("\n".join(handler.messages()))


@pytest.fixture
def runners():
    made = []

    def make(path, timeout=10.0):
        h = Hooks(path, timeout, KEY, VALUE)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def write_hook(path, body, mode=0o755):
    """A POSIX sh hook; written beside and renamed, as an upgrade would replace it."""
    tmp = str(path) + ".new"
    with open(tmp, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(tmp, mode)
    os.rename(tmp, str(path))
    return str(path)


# Appends "start STATE T PID KEY VALUE session=ID" and "end STATE T" to $rec and flags overlaps
# with an atomic mkdir: two calls inside at once leave "OVERLAP".
RECORDER = """
rec={rec}
mkdir "$rec.lock" 2>/dev/null || echo OVERLAP >> "$rec"
echo "start $1 $(date +%s.%N) $$ $2 $3 session=$VIP_ELECTOR_SESSION" >> "$rec"
{middle}
echo "end $1 $(date +%s.%N)" >> "$rec"
rmdir "$rec.lock"
"""


def recorder(tmp_path, middle="", name="hook"):
    rec = tmp_path / (name + ".rec")
    path = write_hook(tmp_path / name, RECORDER.format(rec=rec, middle=middle))
    return path, rec


def records(rec, kind=None):
    if not rec.exists():
        return []
    lines = [line.split() for line in rec.read_text().splitlines() if line]
    return [line for line in lines if kind is None or line[0] == kind]


def states_called(rec):
    return [line[1] for line in records(rec, "start")]


def call_started(h, rec, state, reason="test"):
    """Announce state; wait until its call has started; return (its record, monotonic time)."""
    h.announce(state, reason)
    wait_for(lambda: state in states_called(rec), 10, "the %s call" % state)
    return [r for r in records(rec, "start") if r[1] == state][-1], time.monotonic()


def proc_gone(pid):
    """Neither running nor a zombie: /proc has no entry for it."""
    return not os.path.exists("/proc/%d" % int(pid))


# ---------------------------------------------------------------- the calls

def test_arguments_environment_stdin_and_cwd(tmp_path, runners, hook_log, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "secret-token-never-in-a-hook")
    monkeypatch.setenv("LANG", "C.UTF-8")
    out = tmp_path / "seen"
    path = write_hook(tmp_path / "hook", f"""
{{ echo "args=$#:$1|$2|$3"; env; echo "cwd=$(pwd)"; echo "stdin=$(readlink /proc/self/fd/0)"; }} > {out}.tmp
mv {out}.tmp {out}
""")
    h = runners(path)
    h.announce(LEADER, "acquired the key", session="sess-1234")
    wait_for(out.exists, 10, "the hook's record")
    seen = out.read_text().splitlines()
    assert "args=3:leader|%s|%s" % (KEY, VALUE) in seen
    env = dict(line.split("=", 1) for line in seen if "=" in line and not line.startswith("args="))
    assert env["VIP_ELECTOR_STATE"] == "leader"
    assert env["VIP_ELECTOR_KEY"] == KEY
    assert env["VIP_ELECTOR_VALUE"] == VALUE
    assert env["VIP_ELECTOR_SESSION"] == "sess-1234"
    assert env["VIP_ELECTOR_REASON"] == "acquired the key"
    assert env["LANG"] == "C.UTF-8"
    assert "/usr/sbin" in env["PATH"] and "/bin" in env["PATH"]
    assert "CONSUL_HTTP_TOKEN" not in env
    assert "secret-token" not in out.read_text()
    assert env["cwd"] == "/"
    assert env["stdin"] == "/dev/null"
    wait_for(lambda: hook_log.find("hook hook leader: exited 0 after"), 10, "the exit line")
    assert hook_log.find("hook hook leader: started (acquired the key)")


def test_first_call_always_runs_then_only_changes(tmp_path, runners, hook_log):
    path, rec = recorder(tmp_path)
    h = runners(path)
    h.announce(STANDBY, "starting: key held by node-b")
    wait_for(lambda: records(rec, "end"), 10, "the first call")
    for _ in range(5):
        h.announce(STANDBY, "still a follower")
    h.announce(LEADER, "acquired")
    wait_for(lambda: len(records(rec, "end")) == 2, 10, "the leader call")
    h.finish(time.monotonic() + 5)
    assert states_called(rec) == [STANDBY, LEADER]
    # A new runner (a restart or a re-execution) calls the current state again.
    h.close()
    h2 = runners(path)
    h2.announce(LEADER, "resumed the session")
    wait_for(lambda: len(records(rec, "end")) == 3, 10, "the call after a restart")
    assert states_called(rec) == [STANDBY, LEADER, LEADER]


def test_rapid_changes_never_overlap_and_end_with_the_final_state(tmp_path, runners, hook_log):
    path, rec = recorder(tmp_path, middle="sleep 0.05")
    h = runners(path)
    started = time.monotonic()
    for _ in range(50):
        h.announce(LEADER, "acquired")
        h.announce(STANDBY, "check failed")
    h.announce(LEADER, "acquired")
    assert time.monotonic() - started < 1.0, "announce must never wait for a hook"
    h.finish(time.monotonic() + 20)
    calls = states_called(rec)
    assert "OVERLAP" not in rec.read_text()
    assert calls[-1] == LEADER
    assert all(a != b for a, b in zip(calls, calls[1:])), calls  # level-triggered
    assert len(calls) < 20, "superseded states must be skipped, not queued: %s" % calls
    assert len(records(rec, "end")) == len(calls)
    starts = [float(r[2]) for r in records(rec, "start")]
    ends = [float(r[2]) for r in records(rec, "end")]
    for end, next_start in zip(ends, starts[1:]):
        assert end <= next_start  # in order, one at a time


def test_hung_hook_is_terminated_and_the_next_change_gets_its_call(tmp_path, runners, hook_log):
    path, rec = recorder(tmp_path, middle='[ "$1" = leader ] && sleep 600')
    h = runners(path, timeout=0.5)
    (_, _, _, pid, *_), _ = call_started(h, rec, LEADER)
    t0 = time.monotonic()
    call_started(h, rec, STANDBY)
    assert time.monotonic() - t0 < 5
    wait_for(lambda: hook_log.find("hook hook leader: killed by SIGTERM"), 10, "the kill line")
    assert hook_log.find("hook hook leader: still running after", logging.WARNING)
    wait_for(lambda: proc_gone(pid), 5, "the hung hook reaped")


def test_hook_ignoring_sigterm_gets_sigkill(tmp_path, runners, hook_log):
    path, rec = recorder(tmp_path, middle="trap '' TERM; while :; do sleep 0.1; done")
    h = runners(path, timeout=0.3)
    (_, _, started, pid, *_), _ = call_started(h, rec, STANDBY)
    wait_for(lambda: hook_log.find("killed by SIGKILL"), 15, "SIGKILL")
    # SIGTERM at the 0.3 s timeout, SIGKILL 2 s after it (KILL_AFTER), from the
    # runner's own log records (wall clock, as the hook's `date` start record);
    # the upper bounds only allow for a loaded machine.
    term, kill = hook_log.first("sending SIGTERM").created, hook_log.first("sending SIGKILL").created
    assert 0.3 - 0.1 <= term - float(started) < 0.3 + 3, term - float(started)
    assert KILL_AFTER - 0.01 <= kill - term < KILL_AFTER + 3, kill - term
    wait_for(lambda: proc_gone(pid), 5, "the hook reaped")


def test_finish_with_a_hung_hook_returns_by_the_deadline(tmp_path, runners, hook_log):
    path, rec = recorder(tmp_path, middle="trap '' TERM; while :; do sleep 0.1; done")
    h = runners(path, timeout=60)
    (_, _, _, pid, *_), t0 = call_started(h, rec, STANDBY)
    h.finish(t0 + 1.5)
    took = time.monotonic() - t0
    assert took < 1.5 + 0.5, took
    wait_for(lambda: proc_gone(pid), 5, "the hook killed and reaped")
    assert hook_log.find("sending SIGTERM")


def test_finish_lets_the_queued_call_run(tmp_path, runners, hook_log):
    path, rec = recorder(tmp_path, middle="sleep 0.3")
    h = runners(path)
    h.announce(LEADER, "acquired")
    h.announce(STANDBY, "planned stop")
    h.finish(time.monotonic() + 10)
    assert states_called(rec)[-1] == STANDBY
    assert records(rec, "end")[-1][1] == STANDBY  # finished, not killed


def test_finish_and_close_without_hook_or_calls(tmp_path, runners):
    h = runners(None)
    h.announce(LEADER, "acquired")
    h.finish(time.monotonic() + 1)
    h.close()
    path, rec = recorder(tmp_path)
    h2 = runners(path)
    t0 = time.monotonic()
    h2.finish(t0 + 5)
    h2.close()
    assert time.monotonic() - t0 < 1
    assert not rec.exists()


def test_close_kills_a_running_hook(tmp_path, runners, hook_log):
    path, rec = recorder(tmp_path, middle="trap '' TERM; sleep 600")
    h = runners(path, timeout=60)
    (_, _, _, pid, *_), t0 = call_started(h, rec, LEADER)
    h.close()
    assert time.monotonic() - t0 < 3
    wait_for(lambda: proc_gone(pid), 5, "the hook killed and reaped")
    h.announce(STANDBY, "after close")  # ignored, no error
    assert states_called(rec) == [LEADER]


def test_nonzero_exit_and_output_are_logged(tmp_path, runners, hook_log):
    path = write_hook(tmp_path / "fence", "echo 'to stdout'; echo 'to stderr' >&2; exit 3\n")
    h = runners(path)
    h.announce(STANDBY, "check failed")
    wait_for(lambda: hook_log.find("exited 3"), 10, "the exit line")
    assert hook_log.find("hook fence standby: exited 3 after", logging.WARNING)
    assert "hook fence: to stdout" in hook_log.messages()
    assert "hook fence: to stderr" in hook_log.messages()


def test_megabytes_of_output_are_bounded_and_drained(tmp_path, runners, hook_log):
    path, rec = recorder(tmp_path, middle="""
yes 'a line of output' | head -n 100000
head -c 3000000 /dev/zero | tr '\\0' x
echo
""")
    h = runners(path, timeout=60)
    t0 = time.monotonic()
    h.announce(LEADER, "acquired")
    wait_for(lambda: hook_log.find("exited 0"), 30, "the call to end")
    assert time.monotonic() - t0 < 30
    assert records(rec, "end"), "the hook must not block on a full pipe"
    output = [m for m in hook_log.messages() if m.startswith("hook hook: ")]
    assert len(output) <= MAX_LINES + 1
    assert all(len(m) <= MAX_LINE + 40 for m in output)
    dropped = hook_log.find("not logged", logging.WARNING)
    assert dropped and "lines" in dropped[0] and "bytes" in dropped[0]


def test_a_line_without_end_is_truncated(tmp_path, runners, hook_log):
    path = write_hook(tmp_path / "hook", "head -c 200000 /dev/zero | tr '\\0' y; echo; echo after\n")
    h = runners(path)
    h.announce(LEADER, "acquired")
    wait_for(lambda: hook_log.find("exited 0"), 20, "the call to end")
    output = [m for m in hook_log.messages() if m.startswith("hook hook: ")]
    assert output[0].startswith("hook hook: yyyy") and output[0].endswith("[...]")
    assert len(output[0]) <= MAX_LINE + 40
    assert "hook hook: after" in output


def test_children_that_outlive_the_hook_are_killed(tmp_path, runners, hook_log):
    pids = tmp_path / "children"
    path = write_hook(tmp_path / "hook", f"""
sleep 600 &
echo $! >> {pids}
( trap '' TERM HUP; exec sleep 600 ) > /dev/null 2>&1 &
echo $! >> {pids}
exit 0
""")
    h = runners(path)
    h.announce(LEADER, "acquired")
    wait_for(lambda: hook_log.find("exited 0"), 10, "the call to end")
    children = pids.read_text().split()
    assert len(children) == 2
    wait_for(lambda: all(proc_gone(p) for p in children), 10, "the children to be killed")


def test_hook_closing_its_stdin_and_stdout(tmp_path, runners, hook_log):
    path, rec = recorder(tmp_path, middle="exec 0<&- 1>&- 2>&-; sleep 0.1")
    h = runners(path)
    h.announce(LEADER, "acquired")
    wait_for(lambda: hook_log.find("exited 0"), 10, "the call to end")
    assert records(rec, "end")


def test_hook_replaced_or_removed_on_disk(tmp_path, runners, hook_log):
    out = tmp_path / "versions"
    path = write_hook(tmp_path / "hook", f"echo v1 $1 >> {out}\n")
    h = runners(path)
    h.announce(LEADER, "acquired")
    wait_for(lambda: out.exists() and "v1 leader" in out.read_text(), 10, "v1's call")
    write_hook(tmp_path / "hook", f"echo v2 $1 >> {out}\n")
    h.announce(STANDBY, "lost")
    wait_for(lambda: "v2 standby" in out.read_text(), 10, "v2's call")
    os.unlink(path)
    h.announce(LEADER, "acquired")
    wait_for(lambda: hook_log.find("hook hook leader: not run", logging.ERROR), 10, "the error")
    assert "no such file" in hook_log.find("not run")[0]
    write_hook(tmp_path / "hook", f"echo v3 $1 >> {out}\n", mode=0o644)
    h.announce(STANDBY, "lost")
    wait_for(lambda: len(hook_log.find("not run", logging.ERROR)) == 2, 10, "the second error")
    assert "not executable" in hook_log.find("not run")[1]
    os.chmod(path, 0o755)
    h.announce(LEADER, "acquired")
    wait_for(lambda: "v3 leader" in out.read_text(), 10, "v3's call")


def test_hook_that_cannot_be_executed(tmp_path, runners, hook_log):
    path = tmp_path / "hook"
    path.write_text("#!/nonexistent/interpreter\n")
    path.chmod(0o755)
    h = runners(str(path))
    h.announce(LEADER, "acquired")
    wait_for(lambda: hook_log.find("cannot run", logging.ERROR), 10, "the error")
    h.announce(STANDBY, "lost")
    wait_for(lambda: len(hook_log.find("cannot run", logging.ERROR)) == 2, 10, "the second error")


def test_an_internal_error_is_logged_and_the_runner_carries_on(tmp_path, runners, monkeypatch):
    logger = logging.getLogger("vip_elector")
    handler = LogRecords()
    logger.addHandler(handler)
    try:
        path, rec = recorder(tmp_path)
        h = runners(path)
        real_run = Hooks._run
        calls = []

        def broken_once(self, call):
            calls.append(call.state)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            return real_run(self, call)

        monkeypatch.setattr(Hooks, "_run", broken_once)
        h.announce(LEADER, "acquired")
        wait_for(lambda: handler.find("internal error in the hook runner"), 10, "the error line")
        assert any(r.exc_info for r in handler.records)
        h.announce(STANDBY, "lost")
        wait_for(lambda: records(rec, "end"), 10, "the next call")
        assert states_called(rec) == [STANDBY]
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------- validation

def test_validate_returns_the_absolute_path(tmp_path, monkeypatch):
    write_hook(tmp_path / "hook", "exit 0\n")
    monkeypatch.chdir(tmp_path)
    assert validate_hook("hook") == str(tmp_path / "hook")


@pytest.mark.parametrize("case,words", [
    ("missing", "no such file"),
    ("directory", "not a regular file"),
    ("not-executable", "chmod 0755"),
    ("group-writable", "writable by group or others"),
    ("other-writable", "writable by group or others"),
    ("open-directory", "its directory"),
])
def test_validate_refuses(tmp_path, case, words):
    d = tmp_path / "d"
    d.mkdir()
    path = d / "hook"
    if case == "directory":
        path.mkdir()
    elif case != "missing":
        write_hook(path, "exit 0\n", mode={"not-executable": 0o644, "group-writable": 0o775,
                                           "other-writable": 0o757}.get(case, 0o755))
    if case == "open-directory":
        d.chmod(0o777)
    with pytest.raises(ConfigError) as err:
        validate_hook(str(path))
    message = str(err.value)
    assert message.startswith("--hook %s: " % path)
    assert words in message
    assert "\n" not in message and "Error" not in message


def test_sticky_world_writable_directory_is_fine(tmp_path):
    d = tmp_path / "sticky"
    d.mkdir()
    d.chmod(0o1777)
    path = write_hook(d / "hook", "exit 0\n")
    assert validate_hook(path) == path


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the hook another owner")
def test_validate_refuses_another_owner(tmp_path):
    path = write_hook(tmp_path / "hook", "exit 0\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError) as err:
        validate_hook(path)
    assert "owned by uid 65534" in str(err.value) and "chown root:" in str(err.value)
    os.chown(path, 0, 0)
    assert validate_hook(path) == path


def test_validate_refuses_non_executable_for_root_too(tmp_path):
    path = write_hook(tmp_path / "hook", "exit 0\n", mode=0o600)
    with pytest.raises(ConfigError, match="not executable"):
        validate_hook(path)
    os.chmod(path, 0o700)
    assert validate_hook(path) == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
