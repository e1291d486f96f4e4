# A Consul service with a health check that vip-elector binds leadership to.
# Copy to /etc/consul.d/haproxy.hcl on every node, run `consul reload`, and
# add the check's ID to /etc/default/vip-elector:
#   VIP_ELECTOR_OPTS="--vip-manager-config=/etc/vip-manager.yml --check-id=vip-haproxy"
#
# vip-elector's Consul session carries serfHealth and this check. While the
# check is critical (or not registered) the node does not compete for the
# key; when it turns critical on the leader, Consul invalidates the session,
# deletes the key, and another healthy node takes the virtual IP.
#
# Check IDs must be unique on the agent, so use an explicit "id" and the
# same one on every node. Verify with:
#   consul members; curl -s http://127.0.0.1:8500/v1/agent/checks
#   vip-elector --check --vip-manager-config=/etc/vip-manager.yml --check-id=vip-haproxy

service {
  name = "haproxy"
  port = 5000

  check {
    id       = "vip-haproxy"
    name     = "HAProxy answers on its health endpoint"
    # HAProxy: `monitor-uri /healthz` in a frontend bound to port 8404.
    http     = "http://127.0.0.1:8404/healthz"
    interval = "2s"
    timeout  = "1s"
  }
}

# The same for a PostgreSQL node that should hold the address only while it
# accepts connections (a script check needs enable_local_script_checks = true
# in the agent's configuration and pg_isready from postgresql-client):
#
# service {
#   name = "postgresql"
#   port = 5432
#
#   check {
#     id       = "vip-postgresql"
#     name     = "PostgreSQL accepts connections"
#     args     = ["/usr/bin/pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]
#     interval = "2s"
#     timeout  = "1s"
#   }
# }
