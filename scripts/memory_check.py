#!/usr/bin/env python3
"""Check `shears plan`'s memory estimate against the peak RSS of real CPU pruning runs.

For each compute setting (precision:checkpointing, e.g. f32:none, bf16-mixed:layers) and each
micro-batch size it runs `shears prune` on SmolLM2-135M for two steps on the flex CPU backend
and reads the child's peak resident set size, then asks `shears plan --config` for the same run
plan (device cpu; fused kernels in f32, the generic composition in bf16, as flex runs them) and
prints both with their ratio. Exit status 1 when any estimate is off by more than --tolerance.

    python3 scripts/memory_check.py --shears target/release/shears --data DIR \
        [--batches 2 4 8] [--settings f32:none f32:layers f32:none:generic bf16-mixed:layers]

DIR is a `shears prepare` output made with SmolLM2's tokenizer; --seq-len must not exceed its
sequence length. Run it on an otherwise idle machine with enough memory (8 sequences of 512
tokens peak near 8 GiB).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

TARGET = {  # the demo's target: 20 layers / 384 / 6 heads (3 kv) / 1024
    "num_hidden_layers": 20,
    "hidden_size": 384,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "intermediate_size": 1024,
}


def peak_rss_of(cmd, env=None):
    """Run cmd in a fresh child of a fresh interpreter, return (returncode, peak RSS bytes)."""
    probe = (
        "import resource, subprocess, sys, json;"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE);"
        "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        " r.stderr.decode(errors='replace')[-2000:]]))"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                         env=env)
    rc, kib, err = json.loads(out.stdout)
    return rc, kib * 1024, err


def measure(a, tmp, precision, checkpointing, kernels, b):
    name = f"{precision}-{checkpointing}-{kernels or 'default'}-{b}"
    plan = os.path.join(tmp, f"{name}.toml")
    with open(plan, "w") as f:
        f.write(f'model = "{a.model}"\ndata = "{a.data}"\n[target]\n')
        f.writelines(f"{k} = {v}\n" for k, v in TARGET.items())
        f.write(
            f"[run]\nsteps = 2\nbatch_size = {b}\nmicro_batch = {b}\n"
            f"seq_len = {a.seq_len}\neval_interval = 1000\neval_sequences = 8\n"
            f'backend = "flex"\nprecision = "{precision}"\ncheckpointing = "{checkpointing}"\n'
        )
    env = dict(os.environ)
    plan_flags = []
    if kernels == "generic":
        # flex without its fused kernels runs burn's generic composition, as cuda does.
        env["SHEARS_FUSED"] = "0"
        plan_flags = ["--kernels", "generic"]
    rc, rss, err = peak_rss_of(
        [a.shears, "prune", "--config", plan, "--out", os.path.join(tmp, f"run-{name}")], env
    )
    if rc != 0:
        sys.exit(f"shears prune ({name}) failed with status {rc}:\n{err}")
    est = subprocess.run([a.shears, "plan", "--config", plan, "--json", *plan_flags],
                         capture_output=True, text=True, check=True)
    memory = json.loads(est.stdout)["memory"]
    total = memory["total"]
    print(f"{precision:>10} checkpointing {checkpointing:<6} batch {b:>3} x {a.seq_len}: "
          f"peak RSS {rss / 2**30:6.2f} GiB, estimate {total / 2**30:6.2f} GiB "
          f"(kernels {memory['settings']['kernels']}; activations: step "
          f"{memory['step_activations'] / 2**30:.2f}, eval {memory['eval_activations'] / 2**30:.2f}), "
          f"estimate/measured {total / rss:.3f}",
          flush=True)
    return {"precision": precision, "checkpointing": checkpointing, "batch": b,
            "seq_len": a.seq_len, "kernels": memory["settings"]["kernels"],
            "peak_rss": rss, "estimate": total, "ratio": total / rss,
            "step_activations": memory["step_activations"],
            "eval_activations": memory["eval_activations"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shears", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--settings", nargs="+", default=["f32:none"],
                    help="precision:checkpointing[:generic] (generic: flex without its fused "
                         "kernels, SHEARS_FUSED=0, what the cuda backend runs)")
    ap.add_argument("--tolerance", type=float, default=0.25)
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in a.settings:
            precision, checkpointing, *rest = setting.split(":")
            kernels = rest[0] if rest else None
            for b in a.batches:
                rows.append(measure(a, tmp, precision, checkpointing, kernels, b))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if abs(r["ratio"] - 1) > a.tolerance]
    if bad:
        sys.exit(f"{len(bad)} estimate(s) off by more than {a.tolerance:.0%}")


if __name__ == "__main__":
    main()
