# Least-privilege Consul ACL policy for vip-elector (Consul >= 1.4 ACL system).
# Replace the key and node names with yours: the key is vip-manager's
# trigger-key (without a leading "/"), the node is the local agent's node name.
#
#   consul acl policy create -name vip-elector-node-a -rules @consul-acl-policy.hcl
#   consul acl token create -description "vip-elector on node-a" -policy-name vip-elector-node-a
#
# Found by experiment on Consul 1.8.7; each rule is needed:
#   key     write: read, watch, acquire and delete (?cas=) the trigger key, and
#                  move its lock to a new session (/v1/txn) after Consul trouble
#   key_prefix write on "<trigger-key>/": this node's candidate key
#                  (<trigger-key>/candidates/<name>, acquired with its session) and
#                  the switchover request (<trigger-key>/switchover) of
#                  'vip-elector list' and 'vip-elector switchover'; vip-manager
#                  reads only the trigger key and sees none of them
#   session write: create, renew and destroy the session on this node
#   node    read:  see this node's health checks (serfHealth and --check-id);
#                  without it Consul silently hides them (an empty list, not
#                  an error) and vip-elector would wait for a check forever
# One token for all nodes: use `session_prefix "" { policy = "write" }` and
# `node_prefix "" { policy = "read" }` instead of the node-specific rules.

key "service/pgcluster/leader" {
  policy = "write"
}

key_prefix "service/pgcluster/leader/" {
  policy = "write"
}

session "node-a" {
  policy = "write"
}

node "node-a" {
  policy = "read"
}
