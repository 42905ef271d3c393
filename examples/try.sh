#!/usr/bin/env bash
# The README's "Running the pieces" in one go (`make try`): two bank participants and a
# coordinator on free loopback ports, accounts opened, a transfer executed and one
# committed step by step, the balances shown. Everything runs in a scratch directory
# that is removed at the end, and every process started here is stopped by its PID,
# whatever happens. Needs the checkout's .venv (`make venv`).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PATH="$here/.venv/bin:$PATH"
command -v accord >/dev/null || { echo "try.sh: no accord in $here/.venv (run make venv)" >&2; exit 1; }
scratch=$(mktemp -d)
pids=()  # started here, stopped at exit (the coordinator first)
stop() {
  set +x
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$scratch"
}
trap stop EXIT
cd "$scratch"

# start NAME COMMAND...: runs a server on port 0 in the background and waits (at most
# 30 s) for its "listening on HOST:PORT" line; the address is left in $addr.
start() {
  local name=$1 log=$scratch/$1.log
  shift
  "$@" >"$log" 2>&1 &
  pids+=("$!")
  echo "started $name (pid $!)"
  for _ in $(seq 1 300); do
    addr=$(sed -n 's/^listening on //p' "$log" | head -n1)
    if [[ -n $addr ]]; then return 0; fi
    if ! kill -0 "$!" 2>/dev/null; then cat "$log" >&2; echo "try.sh: $name exited" >&2; exit 1; fi
    sleep 0.1
  done
  cat "$log" >&2
  echo "try.sh: $name did not listen within 30 s" >&2
  exit 1
}

start bank-a accord participant bank --listen 127.0.0.1:0 --db a.db --service bank-a
a=$addr
start bank-b accord participant bank --listen 127.0.0.1:0 --db b.db --service bank-b
b=$addr
start coordinator accord coordinator --listen 127.0.0.1:0 --wal-dir wal \
  --service "bank-a=$a" --service "bank-b=$b"
export ACCORD_COORDINATOR=$addr

set -x
accord bank open-accounts "$a" x=100
accord bank open-accounts "$b" y=0
accord txn execute 'bank-a/debit:{"account":"x","amount":5}' \
                   'bank-b/credit:{"account":"y","amount":5}' --idempotency-key order-1
gid=$(accord txn begin)
accord txn enlist "$gid" 'bank-a/debit:{"account":"x","amount":5}'
accord txn enlist "$gid" "$b"'/credit:{"account":"y","amount":5}'
accord txn commit "$gid"
accord txn get "$gid" --json
accord txn list --state COMMITTING --state ABORTING
accord txn watch "$gid"
accord bank balances "$a"
accord bank balances "$b"
