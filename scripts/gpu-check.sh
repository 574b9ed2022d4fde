#!/usr/bin/env bash
# The CUDA device check, in two halves (see scripts/gpu_check.py for what the device half runs).
#
#   bash scripts/gpu-check.sh bundle [--cpu] [--out DIR]
#       Here, on the Rust machine: build `shears` and the two test binaries the check runs
#       (`backends`, `compute_settings`) with --features cuda (CUDARC_CUDA_VERSION=13000, the
#       GPU machine's driver), strip them, copy the device script, cubecl.toml (the kernel
#       cache), the random-model generator and the tiny-train fixture (shared/ does not travel)
#       beside them, and check the folder fits what the device tool carries: 64 MiB less the
#       working tree (xz-compressed into shears.xz etc. when it does not). --cpu builds the same bundle without cuda, for the
#       dry run. Default DIR: gpu-bundle/ (git-ignored).
#
#   bash scripts/gpu-check.sh run [--bundle DIR] [--out FILE] [--dry-run] [--budget-s S]
#                                 [--peak-tflops T]
#       On the GPU machine (no Rust, no network; python3): unpack what is compressed (xz, or
#       python3's lzma where there is no xz) and run gpu_check.py, which writes one JSON file
#       (default $OUT/gpu-check.json when $OUT is set, as on the device machine, else
#       gpu-check.json), rewritten after every step. --dry-run runs every step on the flex CPU
#       backend with tiny shapes (what CI does). From this machine, with the device tool:
#         run(command="bash gpu-bundle/gpu-check.sh run", carry=["gpu-bundle"], timeout_s=560)
#
#   bash scripts/gpu-check.sh --dry-run
#       Both halves on this machine: a --cpu bundle, then `run --dry-run` from it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LIMIT=$((64 * 1024 * 1024))

die() { echo "gpu-check: $*" >&2; exit 1; }

bundle() {
  local out="$ROOT/gpu-bundle" cuda=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --cpu) cuda=0 ;;
      --out) out="$2"; shift ;;
      *) die "bundle: unknown argument $1" ;;
    esac
    shift
  done
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shears-target}"
  local features=()
  if [ "$cuda" = 1 ]; then
    features=(--features cuda)
    export CUDARC_CUDA_VERSION=13000
  fi
  rm -rf "$out"
  mkdir -p "$out/tests"
  echo "building shears ${features[*]:-(default features)} into $CARGO_TARGET_DIR"
  local json
  if [ "$cuda" = 1 ]; then
    cargo build -q -p shears-cli --bin shears "${features[@]}"
    # The test binaries' paths, from cargo's own report.
    json=$(cargo test -q -p shears-tests "${features[@]}" --test backends \
      --test compute_settings --no-run --message-format=json)
  else
    # The CPU bundle selects what `cargo test --workspace` builds, so cargo unifies the same
    # features (the CLI tests turn on fault-injection) and reuses its artifacts instead of
    # building a second variant of every crate (about 3.5 minutes of CI).
    cargo build -q --workspace --all-targets
    json=$(cargo test -q --workspace --no-run --message-format=json)
  fi
  cp "$CARGO_TARGET_DIR/debug/shears" "$out/shears"
  for t in backends compute_settings; do
    local exe
    exe=$(printf '%s\n' "$json" | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        print(m["executable"])
' "$t" | tail -1)
    [ -n "$exe" ] || die "no executable for test $t"
    cp "$exe" "$out/tests/$t"
  done
  strip "$out/shears" "$out/tests/"*
  cp scripts/gpu_check.py scripts/gpu-check.sh scripts/cubecl.toml "$out/"
  cp "$ROOT/../shared/gpu/gen_random_llama.py" "$out/" 2>/dev/null \
    || die "../shared/gpu/gen_random_llama.py not found"
  # The compute_settings tests read the tiny-train fixture; ../shared does not travel to the
  # device, so the bundle carries it (gpu_check.py points SHEARS_SHARED at the bundle).
  mkdir -p "$out/fixtures"
  cp -r "$ROOT/../shared/fixtures/tiny-train" "$out/fixtures/" \
    || die "../shared/fixtures/tiny-train not found"
  # The device call carries the working tree too, within the same 64 MiB.
  local tree
  tree=$(git -C "$ROOT" ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  LIMIT=$((LIMIT - tree))
  local size
  size=$(du -sb "$out" | cut -f1)
  if [ "$size" -gt "$LIMIT" ]; then
    echo "bundle is $size bytes, over 64 MiB: compressing the binaries with xz"
    # -3, not -9: 6 s instead of 39 s for the 70 MB cuda `shears` on 2 cores, for 13.2 MB
    # instead of 11.7 MB (the whole bundle stays near half the limit).
    xz -3 -T0 "$out/shears" "$out/tests/"*
    size=$(du -sb "$out" | cut -f1)
  fi
  [ "$size" -le "$LIMIT" ] || die "bundle is $size bytes, over the $LIMIT bytes a device call carries beside the $tree-byte working tree"
  echo "bundle: $out ($size bytes, limit $LIMIT: 64 MiB less the $tree-byte working tree)"
  ls -l "$out" "$out/tests"
}

run() {
  # On the device machine only what is written under $OUT comes back: default there.
  local dir="$ROOT/gpu-bundle" out="${OUT:+$OUT/}gpu-check.json" extra=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --bundle) dir="$2"; shift ;;
      --out) out="$2"; shift ;;
      --dry-run) extra+=(--dry-run) ;;
      --budget-s|--peak-tflops) extra+=("$1" "$2"); shift ;;
      *) die "run: unknown argument $1" ;;
    esac
    shift
  done
  [ -d "$dir" ] || die "no bundle at $dir (build one with: bash scripts/gpu-check.sh bundle)"
  for f in "$dir"/shears.xz "$dir"/tests/*.xz; do
    [ -e "$f" ] || continue
    if command -v xz >/dev/null; then
      xz -dkf "$f"
    else
      python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as i, open(sys.argv[1][:-3], "wb") as o:
    shutil.copyfileobj(i, o)' "$f"
    fi
  done
  chmod +x "$dir/shears" "$dir/tests/"*
  python3 "$dir/gpu_check.py" --bundle "$dir" --out "$out" "${extra[@]}"
}

# Inside a bundle (the GPU machine) there is no Cargo.toml: only `run` makes sense there.
case "${1:-}" in
  bundle) shift; bundle "$@" ;;
  run) shift; run "$@" ;;
  --dry-run)
    shift
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    bundle --cpu --out "$tmp/bundle"
    run --bundle "$tmp/bundle" --dry-run --out "${1:-gpu-check-dry-run.json}"
    ;;
  *) die "usage: gpu-check.sh bundle [--cpu] [--out DIR] | run [--bundle DIR] [--out FILE] [--dry-run] [--budget-s S] [--peak-tflops T] | --dry-run [OUT.json]" ;;
esac
