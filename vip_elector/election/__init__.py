"""The election: one session, one lock, one key (SPEC §4, §8, §9).

    loop.py          the Election loop: asks its parts what is due, maps their answers to roles
    agenda.py        the loop's due times: which Step is due now, when the loop wakes next
    start.py         getting a session: connect (pre-flight), resume the previous run's, or create
    lease.py         the session: create, renew, replace in place, destroy; the claim window
    key.py           the trigger-key: watch index rule, pre-flight, acquire, CAS release
    previous_run.py  the previous run's session (§8.2): resume it, or release it
    cluster.py       §11: our candidate key, priorities, stickiness, preemption, requests
    switchover.py    §11.3 as the leader: review a request, move the lock, settle the move
    withdrawal.py    §12's VIP fault: the session given up while the VIP cannot be held here
    trouble.py       Consul erring (§4.8): said once per reason, a jittered backoff
    lifecycle.py     how the loop ends: a planned stop (§4.5), a reload (§8.3)
    role.py          the role, and the Reporter: logs, STATUS, journal fields, hooks, health watch
    watch.py         the key's watcher thread, and a leader's health watch
    events.py        the Inbox and the events it carries
    timing.py        Timing (its rules checked when built) and Backoff

The contract is at the top of loop.py.
"""

from .events import RELOAD, CheckCritical, Inbox, KeyChanged, Reload, Stop, WatchFailed
from .key import TriggerKey
from .lease import Lease
from .lifecycle import Lifecycle
from .loop import Election, Outcome
from .previous_run import PreviousRun
from .role import Reporter, Role
from .timing import Backoff, Timing
from .watch import HANDOFF_WAIT, HealthWatch, KeyWatcher

__all__ = ["Election", "Role", "Outcome", "Timing", "Backoff", "KeyWatcher", "HealthWatch", "Inbox",
           "Stop", "Reload", "RELOAD", "KeyChanged", "WatchFailed", "CheckCritical", "Lease",
           "TriggerKey", "PreviousRun", "Reporter", "Lifecycle", "HANDOFF_WAIT"]
