# Least-privilege Consul ACL policy for vip-elector (Consul >= 1.4 ACL system),
# for the setup the other examples describe: vip-manager.yml's trigger-key
# service/haproxy-vip/leader, the node node-a, and the check vip-haproxy of
# the service haproxy (consul-service-check.hcl). Replace the key, node and
# service names with yours: the key is vip-manager's trigger-key (without a
# leading "/"), the node is the local agent's node name, the service is the
# one whose check --check-id names.
#
#   consul acl policy create -name vip-elector-node-a -rules @consul-acl-policy.hcl
#   consul acl token create -description "vip-elector on node-a" -policy-name vip-elector-node-a
#   vip-elector --check-service     # says which call is refused and which rule is missing
#
# Found by experiment on Consul 1.8.7 (tests/test_check_report.py proves this
# very file against an agent with ACLs on, default deny):
#   key     write: read, watch, acquire and delete (?cas=) the trigger key, and
#                  move its lock to a new session (/v1/txn) after Consul trouble
#   key_prefix write on "<trigger-key>/": this node's candidate key
#                  (<trigger-key>/candidates/<name>, acquired with its session) and
#                  the switchover request (<trigger-key>/switchover) of
#                  'vip-elector list' and 'vip-elector switchover'; vip-manager
#                  reads only the trigger key and sees none of them
#   session write: create, renew, read and destroy the session on this node.
#                  Creating a session bound to serfHealth and a check needs
#                  nothing else: Consul judges the checks itself, whatever
#                  the token may read.
#   service read:  see the check of the service haproxy (vip-haproxy) on the
#                  local agent. vip-elector reads it to know when to compete
#                  and, while it leads, to know the check still passes.
#                  Without it Consul silently hides the check (an empty list,
#                  not an error) and vip-elector would wait for it forever;
#                  node read does not show a service's check.
#   node_prefix read: see the node's own checks: needed when --check-id names
#                  a node check (one defined without a service) instead;
#                  `vip-elector --check` reads the node's checks in the
#                  catalog (serfHealth, vip-haproxy) to tell a check the
#                  servers never got from one the token may not see. And on
#                  every node: when Consul itself ends the leader's session,
#                  the others read the former leader's node in the catalog
#                  once (serfHealth and its checks) to tell a stale "failed"
#                  verdict after a partition heals (they leave the key to it,
#                  SPEC §11.4) from a real failure (they take over the moment
#                  the lock-delay ends). Without read on the other nodes a
#                  failover waits 0.5 s longer, and 'vip-elector list' shows
#                  the others' checks as they were when they last wrote.
# agent read is not needed (the node's name is learned from the session).
#
# One token for all nodes: use `session_prefix "" { policy = "write" }` instead
# of the node-specific session rule.

key "service/haproxy-vip/leader" {
  policy = "write"
}

key_prefix "service/haproxy-vip/leader/" {
  policy = "write"
}

session "node-a" {
  policy = "write"
}

service "haproxy" {
  policy = "read"
}

node_prefix "" {
  policy = "read"
}
