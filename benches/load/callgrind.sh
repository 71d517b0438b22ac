#!/usr/bin/env bash
# Where a stack's server spends its instructions per request: one server of the load harness
# under valgrind's callgrind, driven by wrk as the harness drives it (32 connections cycling
# through 32 seeded sessions), counted only while the measured load runs.
#
#   benches/load/callgrind.sh STACK ROUTE [SECONDS]
#   benches/load/callgrind.sh ours-session-copy write 5
#
# STACK is one of the harness's stacks (benches/load/src/servers.rs), ROUTE `read` or `write`.
# Prints the requests served, the instructions per request, and the crate's functions with
# their inclusive instructions per request; the profile stays in
# benches/load/results/callgrind/ for callgrind_annotate. Instructions are not time (the
# kernel's share is not counted at all), but they repeat from run to run where seconds do not,
# so they show what a change to the request path saves.
#
# Needs valgrind, wrk, curl and redis-server on the PATH, and the harness built:
#   cargo build --release --manifest-path benches/load/Cargo.toml
# (TURNSTILE_LOAD=path runs another build of the harness, an older commit's say, to compare.)
set -euo pipefail

stack=${1:?usage: callgrind.sh STACK ROUTE [SECONDS]}
route=${2:?usage: callgrind.sh STACK ROUTE [SECONDS]}
seconds=${3:-5}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${TURNSTILE_LOAD:-$here/target/release/turnstile-load}
out=$here/results/callgrind
[ -x "$bin" ] || { echo "build the harness first (see the header of $0)" >&2; exit 1; }
for tool in valgrind callgrind_annotate callgrind_control wrk curl redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "$tool is not on the PATH" >&2; exit 1; }
done
case $route in read) method=GET ;; write) method=POST ;; *) echo "ROUTE: read or write" >&2; exit 1 ;; esac
mkdir -p "$out"
scratch=$(mktemp -d)

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
redis_port=$(free_port)
port=$(free_port)
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize yes --logfile "$scratch/redis.log" --dir "$scratch"
profile=$out/$stack-$route.callgrind
valgrind --tool=callgrind --callgrind-out-file="$profile.%p" \
  "$bin" serve "$stack" "$port" "redis://127.0.0.1:$redis_port/" >"$scratch/server.log" 2>&1 &
server=$!
for _ in $(seq 1 200); do
  curl -s -o /dev/null "http://127.0.0.1:$port/read" && break
  sleep 0.3
done

# 32 sessions, seeded as the harness seeds them: one POST /write each, its cookie kept.
cookies=""
for _ in $(seq 1 32); do
  cookie=$(curl -s -D - -o /dev/null -X POST "http://127.0.0.1:$port/write" \
    | tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\).*/\1/p')
  cookies="$cookies\"$cookie\", "
done
cat >"$scratch/load.lua" <<LUA
local cookies = { $cookies }
local i = 0
request = function()
  i = i % #cookies + 1
  local headers = {}
  if cookies[i] ~= "" then headers["Cookie"] = cookies[i] end
  return wrk.format("$method", "/$route", headers)
end
LUA

wrk -t1 -c32 -d2s -s "$scratch/load.lua" "http://127.0.0.1:$port/$route" >/dev/null
callgrind_control -z "$server" >/dev/null 2>&1
wrk -t1 -c32 -d"${seconds}s" -s "$scratch/load.lua" "http://127.0.0.1:$port/$route" >"$scratch/wrk.txt"
callgrind_control -d "$server" >/dev/null 2>&1
sleep 1
pid=$server
kill "$server"
wait "$server" 2>/dev/null || true
server=""
# The dump holds the measured run; the file written at exit, what came after it.
mv "$profile.$pid.1" "$profile"
rm -f "$profile.$pid"
requests=$(grep -o '[0-9]* requests in' "$scratch/wrk.txt" | cut -d' ' -f1)
total=$(callgrind_annotate "$profile" 2>/dev/null | grep -m1 'PROGRAM TOTALS' | awk '{print $1}' | tr -d ,)
echo "$stack $route: $requests requests, $((total / requests)) instructions per request"
echo "the crate's functions, inclusive instructions per request:"
callgrind_annotate --inclusive=yes --threshold=100 --auto=no "$profile" 2>/dev/null \
  | grep 'tower_turnstile' \
  | sed -E 's/^ *([0-9,]+) +\( *[0-9.]+%\) +/\1 /; s# \[[^]]*\]$##' \
  | awk -v n="$requests" '{ c = $1; gsub(",", "", c); $1 = ""; printf "%8d %s\n", c / n, $0 }' \
  | sed "s#$root/##; s#/[^ ]*/registry/src/[^/]*/##; s#/rustc/[0-9a-f]*/##" \
  | head -40
echo "profile: $profile"
