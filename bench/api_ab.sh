#!/bin/bash
# An old and a new build's API on one cache, interleaved by the caller:
#   bench/api_ab.sh PYZ LABEL CACHE_DIR PATHS_FILE [PORT]
# serves CACHE_DIR with PYZ, runs three 10 s `wrk -t2 -c16` over random lines of PATHS_FILE
# (GET /content/B64 paths, one per line; bench/growth.py and bench/run.py scenario 5 write
# such a file with their entries), then 8 s on the first path alone; prints GET/s, p50, p99,
# then serve's RSS. Needs wrk. BENCHMARKS.md ran it as: for x in old new new old.
set -euo pipefail
PYZ=$1; L=$2; CACHE=$3; PATHS=$4; PORT=${5:-18090}
LUA=$(mktemp --suffix=.lua)
trap 'rm -f "$LUA"' EXIT
cat > "$LUA" <<'LUA'
local paths = {}
local counter = 0
setup = function(thread) counter = counter + 1; thread:set("id", counter) end
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  math.randomseed(os.time() * 100 + (id or 0))
end
request = function() return wrk.format("GET", paths[math.random(#paths)]) end
LUA
python3 "$PYZ" serve --cache-dir "$CACHE" --address "127.0.0.1:$PORT" >/dev/null 2>&1 &
PID=$!
for _ in $(seq 100); do curl -s -o /dev/null "localhost:$PORT/healthz" && break; sleep 0.2; done
echo "== $L load $(cut -d' ' -f1-3 /proc/loadavg)"
summary='/50%/{p50=$2}/99%/{p99=$2}/Requests\/sec/{r=$2}END{print r" GET/s p50 "p50" p99 "p99}'
for i in 1 2 3; do
  echo -n "$L random run $i: "
  wrk -t2 -c16 -d10s --latency -s "$LUA" "http://127.0.0.1:$PORT" "$PATHS" | awk "$summary"
done
echo -n "$L one entry: "
wrk -t2 -c16 -d8s --latency "http://127.0.0.1:$PORT$(head -1 "$PATHS")" | awk "$summary"
echo "$L rss_kib $(ps -o rss= -p $PID)"
kill $PID
wait $PID 2>/dev/null || true
