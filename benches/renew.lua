-- wrk script for benches/dns-bench.sh --api: every request renews one node's lease.
--   wrk -t 2 -c 64 -d 10s --latency -s benches/renew.lua \
--       http://127.0.0.1:8053/v1/roles/bench/nodes/n1
-- The node is registered with the same body before wrk starts, so every request is a renewal.
wrk.method = "PUT"
wrk.body = '{"addr":"10.9.0.1","port":8080,"ttl":60}'
wrk.headers["Content-Type"] = "application/json"
