#!/usr/bin/env bash
# Pipeline vs single node: steps/s of the `default` preset, batch 4 x 32, 2 micro-batches.
set -u
B=${B:-${CARGO_TARGET_DIR:-target}/debug/neuroshard}
W=$(mktemp -d); SECS=${SECS:-60}
cfg() { # dir port max_layers seeds
  mkdir -p $1; cat > $1/neuroshard.toml <<T
port = $2
seed_peers = [$4]
[training]
enabled = true
model = "default"
batch_size = 4
seq_len = 32
learning_rate = 0.003
micro_batches = 2
[resources]
max_layers = $3
T
}
rate() { # port -> steps in SECS, plus network json
  local s0=$(curl -s 127.0.0.1:$1/api/v1/status | python3 -c 'import sys,json;print(json.load(sys.stdin)["training"]["step"])')
  sleep $SECS
  local s1=$(curl -s 127.0.0.1:$1/api/v1/status | python3 -c 'import sys,json;print(json.load(sys.stdin)["training"]["step"])')
  echo "steps $s0 -> $s1 in $SECS s: $(python3 -c "print(($s1-$s0)/$SECS)") steps/s"
}
waitstep() { for i in $(seq 120); do s=$(curl -s 127.0.0.1:$1/api/v1/status | python3 -c 'import sys,json;print(json.load(sys.stdin)["training"]["step"] or 0)' 2>/dev/null); [ "${s:-0}" -gt 3 ] && return; sleep 1; done; }
echo "== single node"
cfg $W/s 18600 0 ""
$B --data-dir $W/s start --no-browser > $W/s.log 2>&1 & P=$!
waitstep 18600; rate 18600; kill $P; wait $P 2>/dev/null
echo "== three-stage pipeline"
cfg $W/a 18300 2 ""; $B --data-dir $W/a start --no-browser > $W/a.log 2>&1 & PA=$!; sleep 4
cfg $W/b 18400 1 '"127.0.0.1:19300"'; $B --data-dir $W/b start --no-browser > $W/b.log 2>&1 & PB=$!; sleep 4
cfg $W/c 18500 1 '"127.0.0.1:19300","127.0.0.1:19400"'; $B --data-dir $W/c start --no-browser > $W/c.log 2>&1 & PC=$!
waitstep 18300
n0=$(curl -s 127.0.0.1:18400/api/v1/network | python3 -c 'import sys,json;print(json.load(sys.stdin)["pipeline"]["tensor_bytes"])')
s0=$(curl -s 127.0.0.1:18300/api/v1/network | python3 -c 'import sys,json;print(json.load(sys.stdin)["pipeline"]["steps"])')
rate 18300
n1=$(curl -s 127.0.0.1:18400/api/v1/network | python3 -c 'import sys,json;print(json.load(sys.stdin)["pipeline"]["tensor_bytes"])')
s1=$(curl -s 127.0.0.1:18300/api/v1/network | python3 -c 'import sys,json;d=json.load(sys.stdin)["pipeline"];print(d["steps"])')
echo "worker tensor bytes per pipeline step: $(python3 -c "print(($n1-$n0)/max(1,$s1-$s0))") (steps $s0 -> $s1)"
curl -s 127.0.0.1:18300/api/v1/network | python3 -c 'import sys,json;print(json.load(sys.stdin)["pipeline"])'
kill $PA $PB $PC; wait 2>/dev/null; rm -rf $W
