"""The signal relay: every SIGTERM, SIGINT and SIGHUP reaches the loop or the next program.

Each case runs in a child interpreter: blocking signals would change pytest's own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


PRELUDE = """
    import os, signal, threading, time
    from vip_elector import signals
    got = []
    seen = threading.Event()
    def deliver(signum):
        got.append(signum)
        seen.set()
    def wait(what, predicate):
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, what
            time.sleep(0.005)
"""


def test_signals_reach_the_loop_and_a_stale_wake_is_ignored():
    out = run(PRELUDE + """
    signals.block()
    os.kill(os.getpid(), signals.WAKE)           # as a previous program may leave it
    relay = signals.SignalRelay(deliver).start()
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGTERM)
    wait("two signals delivered", lambda: len(got) == 2)
    time.sleep(0.1)
    print(sorted(int(s) for s in got), relay._thread.is_alive())
    """)
    assert out == "[1, 15] True"


def test_after_hand_over_the_relay_has_ended_and_signals_stay_pending():
    """A relay still running at exec could take a signal and die with it (SPEC §8.3)."""
    out = run(PRELUDE + """
    relay = signals.SignalRelay(deliver).start()
    os.kill(os.getpid(), signal.SIGHUP)
    wait("the SIGHUP delivered", seen.is_set)
    assert relay.hand_over(), "the relay did not end"
    assert not relay._thread.is_alive()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    print(sorted(int(s) for s in got), sorted(int(s) for s in signal.sigpending() - {signals.WAKE}))
    """)
    assert out == "[1] [2, 15]"


def test_a_signal_taken_while_handing_over_is_raised_again():
    """Many tries at the race: whichever side wins, the SIGTERM is delivered or pending."""
    out = run(PRELUDE + """
    lost = 0
    for _ in range(200):
        got.clear()
        relay = signals.SignalRelay(deliver).start()
        sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
        sender.start()
        relay.hand_over()
        sender.join()
        pending = signal.sigpending()
        if signal.SIGTERM not in got and signal.SIGTERM not in pending:
            lost += 1
        # Clear what is pending for the next try.
        for s in pending & signals._WAITED:
            signal.sigwait({s})
    print(lost)
    """)
    assert out == "0"
