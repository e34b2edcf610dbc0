#!/usr/bin/env bash
# Writes to OUT every distinct statement the test suite sends to PostgreSQL, as
# pg_stat_statements normalises it (constants as $n), comments removed and white space
# folded; test database names are folded too. Run it before and after a change that
# must not change the SQL, and diff the two files.
#
#   scripts/statements.sh /tmp/before.txt [cargo test arguments...]
#
# It starts a private cluster of its own (as the `postgres` user when run as root) with
# pg_stat_statements loaded, and runs `cargo test --workspace` against it through
# TEST_DATABASE_URL. Tests that start clusters of their own are not seen.
set -euo pipefail
out=$1; shift
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1)
[ -n "$bin" ] || bin=$(dirname "$(command -v initdb)")
dir=$(mktemp -d /tmp/statements.XXXX)
as=()
if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; as=(runuser -u postgres --); fi
port=$((30000 + RANDOM % 5000))
"${as[@]}" "$bin/initdb" -D "$dir/pg" -A trust -U postgres >/dev/null
cat >> "$dir/pg/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
max_connections = 500
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.max = 200000
pg_stat_statements.track = all
pg_stat_statements.track_utility = on
track_commit_timestamp = on
CONF
"${as[@]}" "$bin/pg_ctl" -D "$dir/pg" -l "$dir/log" -w start >/dev/null
trap '"${as[@]}" "$bin/pg_ctl" -D "$dir/pg" -m immediate stop >/dev/null; rm -rf "$dir"' EXIT
url="postgres://postgres@127.0.0.1:$port/postgres"
psql -q "$url" -c 'CREATE EXTENSION pg_stat_statements'
TEST_DATABASE_URL=$url cargo test --workspace "$@" 2>&1 | grep -E '^test result|FAILED|panicked' || true
psql -qAt "$url" -c "SELECT DISTINCT regexp_replace(regexp_replace(query, '--[^\n]*', '', 'g'), '\s+', ' ', 'g')
                     FROM pg_stat_statements" \
  | sed -E 's/te_[0-9]+_[0-9]+_/te_X_/g' | sort -u > "$out"
wc -l "$out"
