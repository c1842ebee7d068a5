#!/usr/bin/env bash
# DiLoCo settings from evidence (issue #22 item 4): sweeps H, the outer learning rate and
# momentum at one token budget, then the pseudo-gradient compression at the best of them,
# with `diloco_bench` (the engine's real model and control's real DiLoCo code, in process).
# Prints one JSON line per run to $OUT (default diloco-sweep.jsonl) and a markdown table.
#
#   scripts/diloco-sweep.sh                 # tiny, 3 replicas, 2 x 3 x 4 runs + compression
#   MODEL=default TOKENS_STEPS=400 scripts/diloco-sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-tiny}
# Inner steps per replica over the whole budget (rounds x H): the same tokens for every H.
TOKENS_STEPS=${TOKENS_STEPS:-800}
HS=${HS:-"25 50 100 200"}
LRS=${LRS:-"0.5 0.7 1.0"}
MUS=${MUS:-"0.8 0.9"}
OUT=${OUT:-diloco-sweep.jsonl}
cargo build -q -p neuroshard-tests --bin diloco_bench
bench=./target/debug/diloco_bench
: > "$OUT"
run() { "$bench" --model "$MODEL" "$@" | grep '^{' | tee -a "$OUT"; }
# The synchronous anchor once (its loss does not depend on the DiLoCo settings).
run --h 50 --rounds $((TOKENS_STEPS / 50)) >/dev/null
for h in $HS; do
    for lr in $LRS; do
        for mu in $MUS; do
            run --skip-sync --h "$h" --rounds $((TOKENS_STEPS / h)) --outer-lr "$lr" --outer-momentum "$mu" >/dev/null
        done
    done
done
# The best plain setting, then compression levels at it.
best=$(python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
b = min(rows, key=lambda r: r["diloco_eval_loss"])
print(b["h"], round(b["outer_lr"], 3), round(b["outer_momentum"], 3))
PY
)
read -r bh blr bmu <<<"$best"
for enc in "--encoding int8" "--encoding topk --topk-ratio 0.01 --topk-bits 2" \
    "--encoding topk --topk-ratio 0.03 --topk-bits 2" "--encoding topk --topk-ratio 0.03 --topk-bits 4" \
    "--encoding topk --topk-ratio 0.1 --topk-bits 4"; do
    # shellcheck disable=SC2086
    run --skip-sync --h "$bh" --rounds $((TOKENS_STEPS / bh)) --outer-lr "$blr" --outer-momentum "$bmu" $enc >/dev/null
done
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
sync = next(r for r in rows if r.get("sync_eval_loss") is not None)
print(f"model {sync['model']}, {sync['replicas']} replicas, {sync['tokens']} tokens; "
      f"synchronous: loss {sync['sync_eval_loss']:.3f}, {sync['sync_bytes_per_token']:.1f} bytes/token")
print("| H | outer lr | momentum | encoding | DiLoCo loss | vs sync | bytes/token | sync/DiLoCo bytes |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    enc = r["encoding"]
    if enc == "topk":
        enc = f"topk {r['topk_ratio']} x {r['topk_bits']} bit"
    print(f"| {r['h']} | {r['outer_lr']:.2f} | {r['outer_momentum']:.2f} | {enc} | "
          f"{r['diloco_eval_loss']:.3f} | {100 * (r['diloco_eval_loss'] / sync['sync_eval_loss'] - 1):+.1f}% | "
          f"{r['diloco_bytes_per_token']:.2f} | {sync['sync_bytes_per_token'] / r['diloco_bytes_per_token']:.0f}x |")
PY
