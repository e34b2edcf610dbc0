#!/usr/bin/env bash
# Starts PgBouncer in transaction mode (pool 10, as the tests' one) in front of the
# server of DATABASE_URL, its server connections on the benchmarks' schema, for
# `engine bench drain --pooler URL` (docs/benchmarks.md); prints that URL. Runs as
# `postgres` when we are root (PgBouncer refuses root). Stop it with
# `kill $(cat DIR/pgbouncer.pid)`.
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:PORT/task_engine scripts/bench-pooler.sh [DIR] [PORT]
set -euo pipefail
: "${DATABASE_URL:?set DATABASE_URL to the server of the benchmarks}"
dir=${1:-/tmp/bench-pooler}
port=${2:-6439}
server_port=$(sed -E 's|.*:([0-9]+)/.*|\1|' <<<"$DATABASE_URL")
user=$(sed -E 's|^[a-z]+://([^:@/]+).*|\1|' <<<"$DATABASE_URL")
mkdir -p "$dir"
printf '"%s" ""\n' "$user" >"$dir/users.txt"
cat >"$dir/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$server_port connect_query='SET search_path TO task_engine_bench'
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
default_pool_size = 10
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits,options
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
EOF
program=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
if [ "$(id -u)" = 0 ]; then
  chown -R postgres "$dir"
  su postgres -s /bin/sh -c "$program -d $dir/pgbouncer.ini"
else
  "$program" -d "$dir/pgbouncer.ini"
fi
echo "${DATABASE_URL/:$server_port\//:$port/}"
