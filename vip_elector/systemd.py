"""systemd integration: sd_notify and journald. Nothing else knows systemd exists.

Outside systemd (no ``NOTIFY_SOCKET``) the notifier does nothing and costs
nothing; logs then go to stderr as readable lines. Under systemd, logs go to
journald with structured fields, so ``journalctl -u vip-elector -o verbose``
shows the role, key, value and session of every line, and the leadership
events carry fixed MESSAGE_IDs explained by the shipped catalog
(``journalctl -x``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Mapping, Optional

# Fixed MESSAGE_IDs, explained in systemd/vip-elector.catalog.
MESSAGE_ACQUIRED = "5167235c50a3439b965b74c3cb0102bc"
MESSAGE_LOST = "4da94490216148db9573bb18f3304344"
MESSAGE_RELEASED = "071fe3546e774ce5958b0e1e1225c17d"
MESSAGE_CONFIG_ERROR = "b412abd43a9d4152985b34a87c6792f8"
MESSAGE_WAITING = "edd16525a7864980935487e3010dfb57"

IDENTIFIER = "vip-elector"
# python-systemd's journal.send() drops messages without a word when this
# socket is missing (sd_journal_sendv ignores ENOENT): look before using it.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
log = logging.getLogger("vip_elector")


class Notifier:
    """Speaks the sd_notify protocol through python-systemd.

    ``watchdog()`` is meant to be called from the election loop on every turn:
    it sends ``WATCHDOG=1`` only when half of ``WATCHDOG_USEC`` has passed, so
    a loop that stops turning stops the pings and systemd restarts us.
    """

    def __init__(self, env: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.monotonic,
                 send: Optional[Callable[[str], object]] = None):
        self._clock = clock
        self._enabled = bool(env.get("NOTIFY_SOCKET"))
        self._send_fn = send
        self._broken = False
        self._status: Optional[str] = None
        self.watchdog_interval: Optional[float] = None
        self._last_ping = clock()
        if self._enabled and self._send_fn is None:
            try:
                from systemd import daemon
                self._send_fn = daemon.notify
            except ImportError:
                log.warning("NOTIFY_SOCKET is set but python3-systemd is not installed: "
                            "systemd will not hear READY=1 or watchdog pings")
                self._enabled = False
        if self._enabled:
            self.watchdog_interval = _watchdog_interval(env)

    @property
    def active(self) -> bool:
        return self._enabled

    def _send(self, message: str) -> None:
        """Send; a failure is logged once and the next message tries again (§9.1).

        Giving up for good after one error would stop the watchdog pings, and
        systemd would then kill a healthy daemon.
        """
        if not self._enabled:
            return
        try:
            self._send_fn(message)
        except OSError as e:
            if not self._broken:
                log.warning("cannot notify systemd through NOTIFY_SOCKET (%s); trying again "
                            "with every message", e.strerror or e)
            self._broken = True
            return
        if self._broken:
            log.info("notifying systemd works again")
            self._broken = False

    def ready(self) -> None:
        self._send("READY=1")
        self._last_ping = self._clock()

    def status(self, text: str) -> None:
        """Tell ``systemctl status`` what we are doing; sent only when it changes."""
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def reloading(self) -> None:
        """A reload starts; ``ready()`` ends it (systemd 252 has no Type=notify-reload)."""
        self._send("RELOADING=1")

    def final_status(self, text: str) -> None:
        """The last word on every exit path, so ``systemctl status`` never shows a stale role."""
        self._status = None
        self.status(text)

    def next_ping(self) -> Optional[float]:
        """When the loop must be awake next to ping the watchdog (clock time), or None."""
        if not self.watchdog_interval or not self.active:
            return None
        return self._last_ping + self.watchdog_interval

    def watchdog(self) -> None:
        due = self.next_ping()
        if due is not None and self._clock() >= due:
            self._send("WATCHDOG=1")
            self._last_ping = self._clock()


def _watchdog_interval(env: Mapping[str, str]) -> Optional[float]:
    """Half of WATCHDOG_USEC, if the watchdog is meant for us."""
    raw = env.get("WATCHDOG_USEC")
    if raw is None:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", raw)
        return None
    return usec / 2e6


# --------------------------------------------------------------------------
# Logging


class ElectionContext(logging.Filter):
    """Adds the journal fields every line carries (role, key, value, session)."""

    def __init__(self, key: str = "", value: str = ""):
        super().__init__()
        self.role = "starting"
        self.key = key
        self.value = value
        self.session = ""
        self.secrets: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        record.VIP_ELECTOR_ROLE = self.role
        record.VIP_ELECTOR_KEY = self.key
        record.VIP_ELECTOR_VALUE = self.value
        record.VIP_ELECTOR_SESSION = self.session
        for secret in self.secrets:  # belt and braces: a token never reaches a log line
            if secret and secret in record.getMessage():
                record.msg = record.getMessage().replace(secret, "<token>")
                record.args = None
        return True


def _stderr_is_journal(env: Mapping[str, str]) -> bool:
    """systemd sets JOURNAL_STREAM=dev:ino when our stderr is connected to journald."""
    stream = env.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(context: ElectionContext, env: Mapping[str, str] = os.environ,
                  level: int = logging.INFO) -> logging.Logger:
    """journald under systemd, readable lines on stderr otherwise."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(level)
    under_journal = _stderr_is_journal(env)
    journald = under_journal and os.path.exists(JOURNAL_SOCKET)
    handler = _journal_handler() if journald else None
    if handler is None:
        handler = _stderr_handler(plain=under_journal)
    handler.addFilter(context)
    log.addHandler(handler)
    if under_journal and not journald:
        log.warning("JOURNAL_STREAM is set but journald does not listen on %s: logging plain "
                    "lines to stderr", JOURNAL_SOCKET)
    elif under_journal and not isinstance(handler, _Journal):
        log.warning("python3-systemd's journal module is unavailable: logging plain lines to stderr")
    return log


def logging_to_journal() -> bool:
    return any(isinstance(h, _Journal) for h in log.handlers)


def _stderr_handler(plain: bool) -> logging.Handler:
    """Timestamped lines for a terminal; bare messages when journald adds its own."""
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(message)s" if plain else "%(asctime)s %(levelname)-7s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, "%Y-%m-%d %H:%M:%S"))
    return handler


def _journal_handler() -> Optional[logging.Handler]:
    try:
        handler = _Journal()
    except ImportError:
        return None
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


class _Journal(logging.Handler):
    """python-systemd's JournalHandler, falling back to stderr if journald goes away."""

    def __init__(self):
        super().__init__()
        from systemd.journal import JournalHandler
        # An instance of vip-elector@.service logs as vip-elector-NAME, as its unit says.
        instance = os.environ.get("VIP_ELECTOR_INSTANCE")
        self._journal = JournalHandler(SYSLOG_IDENTIFIER=f"{IDENTIFIER}-{instance}" if instance
                                       else IDENTIFIER)
        self._journal.handleError = self._journal_failed
        self._fallback: Optional[logging.Handler] = None

    def setFormatter(self, fmt):
        super().setFormatter(fmt)
        self._journal.setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        if self._fallback is None:
            self._journal.emit(record)
        if self._fallback is not None:
            self._fallback.emit(record)

    def _journal_failed(self, record: logging.LogRecord) -> None:
        if self._fallback is None:
            self._fallback = _stderr_handler(plain=True)
            error = sys.exc_info()[1]
            self._fallback.emit(logging.makeLogRecord({
                "msg": "cannot write to journald (%s): logging plain lines to stderr instead",
                "args": (error,), "levelno": logging.WARNING, "levelname": "WARNING"}))
