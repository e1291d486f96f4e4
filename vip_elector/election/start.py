"""Getting a session (SPEC §4.1, §4.6, §8.2): reach Consul, resume the previous run's, or make one.

The loop asks for this whenever it has no session: at start, and again after
any loss. Consul is first reached through the key's pre-flight (§4.6: never
a key that is not a lock key), once. The previous run's session, when Consul
still has it as ours, is taken up without touching the key; otherwise a new
one is made, unless a bound check is not passing (§4.7). What the node is
meanwhile — leading on with a resumed session, waiting for a check — is the
loop's to say, from the answers here; a Consul error is raised to it.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

from ..config import Settings
from ..consul import ConsulClient, ConsulError
from .cluster import Cluster
from .key import TriggerKey
from .lease import Created, Lease, Unhealthy
from .previous_run import PreviousRun
from .trouble import ConsulTrouble
from .watch import KeyWatcher

log = logging.getLogger("vip_elector")


class Start:
    """Connect once, then resume or create a session, for the loop to ask."""

    def __init__(self, consul: ConsulClient, settings: Settings, lease: Lease, key: TriggerKey,
                 previous: PreviousRun, cluster: Cluster, watcher: KeyWatcher, trouble: ConsulTrouble):
        self.consul, self.settings = consul, settings
        self.lease, self.key, self.previous, self.cluster = lease, key, previous, cluster
        self.watcher, self.trouble = watcher, trouble
        self.connected = False                   # the first read of the key passed pre-flight

    def connect(self) -> None:
        """Reach Consul (once): the key passes pre-flight, the watcher asks afresh."""
        if self.connected:
            return
        self.key.preflight()
        self.connected = True
        try:
            self.lease.node = self.consul.node_name()
        except ConsulError as e:  # for messages only; the session is made on the agent's node anyway
            log.debug("cannot read the agent's node name: %s", e)
        log.info("connected to Consul at %s%s", self.settings.address,
                 f" (node {self.lease.node})" if self.lease.node else "")
        self.watcher.restart()
        self.trouble.over()

    def resume(self) -> Optional[str]:
        """The previous run's session, ours again (§8.2) with the key read since, or None (there
        is none, or it cannot be taken up: it was let go)."""
        if not self.previous.pending:
            return None
        resumed = self.previous.resume(self.lease.node)
        if resumed is None:
            return None
        session = resumed.session
        self.lease.node = self.lease.node or resumed.node
        self.lease.adopt(session, resumed.confirmed_at)
        key = self.key.read()
        self.cluster.session_began(session, resumed=True)
        log.info("resumed session %s%s", session,
                 f": it still holds {self.settings.trigger_key}, leading without touching the key"
                 if key is not None and key.session == session else "")
        return session

    def create(self) -> Union[Created, Unhealthy]:
        """A new session of ours, or why none may be made now (a bound check not passing)."""
        created = self.lease.create()
        if isinstance(created, Unhealthy):
            return created
        self.trouble.over()
        self.lease.adopt(created.session, created.sent, created=True)
        if self.lease.node is None:
            self.lease.learn_node()
        self.cluster.session_began(created.session, resumed=False)
        return created


__all__ = ["Start"]
