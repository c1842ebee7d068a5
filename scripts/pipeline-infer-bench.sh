#!/usr/bin/env bash
# Distributed inference vs one node: greedy decode tokens/s of the `default` preset, training
# off (initial weights), requests at the first stage of a 3-stage pipeline vs one full node.
set -u
B=${B:-${CARGO_TARGET_DIR:-target}/debug/neuroshard}
W=$(mktemp -d); RUNS=${RUNS:-5}; TOKENS=${TOKENS:-200}
cfg() { # dir port max_layers seeds
  mkdir -p $1; cat > $1/neuroshard.toml <<T
port = $2
seed_peers = [$4]
[training]
enabled = false
model = "default"
[resources]
max_layers = $3
T
}
gen() { # port -> "tokens inference_ms"
  curl -s -X POST 127.0.0.1:$1/api/v1/inference -H "Authorization: Bearer $(cat $2/api.cookie)" \
    -H 'Content-Type: application/json' \
    -d "{\"prompt\": \"The river\", \"max_tokens\": $TOKENS, \"temperature\": 0}" |
    python3 -c 'import sys,json;d=json.load(sys.stdin);print(d["tokens_generated"], d["timing"]["inference_ms"])'
}
bench() { # port dir label
  for i in $(seq 60); do gen $1 $2 >/dev/null 2>&1 && break; sleep 1; done
  local tok=0 ms=0
  local out t m
  for r in $(seq $RUNS); do out=$(gen $1 $2); t=${out% *}; m=${out#* }; tok=$((tok + t)); ms=$((ms + m)); done
  echo "$3: $tok tokens in $ms ms over $RUNS requests: $(python3 -c "print(round($tok*1000/$ms, 1))") tokens/s"
}
cfg $W/s 18600 0 ""
$B --data-dir $W/s start --no-browser > $W/s.log 2>&1 & P=$!
bench 18600 $W/s "single node"; kill $P; wait $P 2>/dev/null
cfg $W/a 18300 2 ""; $B --data-dir $W/a start --no-browser > $W/a.log 2>&1 & PA=$!; sleep 4
cfg $W/b 18400 1 '"127.0.0.1:19300"'; $B --data-dir $W/b start --no-browser > $W/b.log 2>&1 & PB=$!; sleep 4
cfg $W/c 18500 1 '"127.0.0.1:19300","127.0.0.1:19400"'; $B --data-dir $W/c start --no-browser > $W/c.log 2>&1 & PC=$!
sleep 4
bench 18300 $W/a "3-stage pipeline (request at the first stage)"
bench 18400 $W/b "3-stage pipeline (request at the middle stage)"
grep -h "pipeline generation" $W/a.log $W/b.log | tail -2 | cut -c1-400 >&2
kill $PA $PB $PC; wait 2>/dev/null; rm -rf $W
