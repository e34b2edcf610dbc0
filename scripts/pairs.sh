#!/usr/bin/env bash
# Two builds of `engine` side by side in one sitting, for a ratio (docs/benchmarks.md):
# A B B A A B ..., a CHECKPOINT and a pause before each run, one database for both.
# Prints each run's last line (the bench's JSON) tagged A or B.
#
#   DATABASE_URL=... scripts/pairs.sh BIN_A BIN_B PAIRS bench drain --batched-only --runs 1
set -euo pipefail
a=$1 b=$2 pairs=$3
shift 3
: "${DATABASE_URL:?set DATABASE_URL: one cluster for both builds}"
for i in $(seq 1 "$pairs"); do
  if (( i % 2 )); then order="A B"; else order="B A"; fi
  for which in $order; do
    bin=$a
    [ "$which" = B ] && bin=$b
    psql "$DATABASE_URL" -qc CHECKPOINT
    sleep 5
    printf '%s %s\n' "$which" "$("$bin" "$@" 2>/dev/null | grep '^{' | tail -1)"
  done
done
