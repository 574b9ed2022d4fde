#!/usr/bin/env bash
# Issue 40's evidence, pruning stage: SmolLM2-135M -> the demo's 51M shape on the demo corpus
# (2 x 128 tokens per step, seed 17, the demo's settings), pruned by
#   l0-uniform     the L0 stage from the reference's init (today's default),
#   l0-importance  the L0 stage from importance-initialised masks (method §12),
#   oneshot        one-shot pruning by activation importance (no steps),
# optionally each L0 variant with KD from the source (KD=1), then finalized and evaluated
# per domain (EVAL sequences of 128 tokens per domain). Prints a markdown table and writes
# $OUT/results.json.
#
#   STEPS=120 EVAL=64 KD=0 bash scripts/compare_pruning.sh [OUT]
#
# Needs the demo corpus (`shears corpus fetch-demo`, cached by `shears demo`) and a built
# `shears` ($CARGO_TARGET_DIR/debug/shears or $SHEARS).
set -euo pipefail
OUT="${1:-runs/compare-pruning}"
STEPS="${STEPS:-120}"
EVAL="${EVAL:-64}"
KD="${KD:-0}"
SHEARS="${SHEARS:-${CARGO_TARGET_DIR:-target}/debug/shears}"
CORPUS="${SHEARS_CACHE:-$HOME/.cache/shears}/corpus/demo"
mkdir -p "$OUT"
[ -d "$OUT/data" ] || "$SHEARS" prepare --plan "$CORPUS/plan.toml" --seq-len 128 --out "$OUT/data"

plan() { # name, [pruning] lines, extra sections
  cat > "$OUT/$1.toml" <<PLAN
model = "smollm2"
data = "$OUT/data"
[target]
num_hidden_layers = 20
hidden_size = 384
num_attention_heads = 6
num_key_value_heads = 3
intermediate_size = 1024
[run]
steps = $STEPS
batch_size = 2
eval_interval = $STEPS
checkpoint_interval = $STEPS
eval_sequences = 4
eval_batch = 4
seed = 17
[dbl]
exhaustion = "wrap"
[pruning]
$2
PLAN
  # Extra sections, with \n for newlines (a variant is one line: see `read` below).
  printf '%b\n' "$3" >> "$OUT/$1.toml"
}

evaluate() { # name, model
  "$SHEARS" eval --model "$2" --data "$OUT/data" --eval-sequences "$EVAL" --seq-len 128 --json \
    > "$OUT/$1.eval.json"
}

variants=("l0-uniform|init = \"uniform\"|" "l0-importance|init = \"importance\"|" "oneshot|method = \"importance\"|")
if [ "$KD" = 1 ]; then
  kd='[distill]\nteacher = "source"\nalpha = 1.0'
  variants+=("l0-uniform-kd|init = \"uniform\"|$kd" "l0-importance-kd|init = \"importance\"|$kd")
fi
[ -f "$OUT/source.eval.json" ] || evaluate source smollm2
for v in "${variants[@]}"; do
  IFS='|' read -r name pruning extra <<<"$v"
  [ -f "$OUT/$name.eval.json" ] && continue
  plan "$name" "$pruning" "$extra"
  start=$(date +%s)
  if [ "$name" = oneshot ]; then
    "$SHEARS" prune --config "$OUT/$name.toml" --out "$OUT/$name.model" --resume
  else
    "$SHEARS" prune --config "$OUT/$name.toml" --out "$OUT/$name.run" --resume
    "$SHEARS" finalize --run "$OUT/$name.run" --out "$OUT/$name.model" --force
  fi
  echo $(( $(date +%s) - start )) > "$OUT/$name.seconds"
  evaluate "$name" "$OUT/$name.model"
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = []
for name in ["source", "l0-uniform", "l0-importance", "oneshot", "l0-uniform-kd", "l0-importance-kd"]:
    p = os.path.join(out, f"{name}.eval.json")
    if not os.path.exists(p):
        continue
    e = json.load(open(p))
    dom = e.get("domains") or e.get("per_domain") or {}
    loss = {d: (v["loss"] if isinstance(v, dict) else v) for d, v in dom.items()}
    sec = os.path.join(out, f"{name}.seconds")
    rows.append((name, loss, int(open(sec).read()) if os.path.exists(sec) else None))
domains = sorted(rows[0][1]) if rows else []
print("| variant | " + " | ".join(domains) + " | mean | wall s |")
print("|---" * (len(domains) + 3) + "|")
for name, loss, sec in rows:
    mean = sum(loss.values()) / max(len(loss), 1)
    print(f"| {name} | " + " | ".join(f"{loss[d]:.3f}" for d in domains) + f" | {mean:.3f} | {sec if sec is not None else ''} |")
json.dump({n: {"loss": l, "seconds": s} for n, l, s in rows}, open(os.path.join(out, "results.json"), "w"), indent=1)
PY
