#!/usr/bin/env python3
"""The device half of the CUDA check: run on the GPU machine (no Rust, no network) from an
unpacked bundle that `scripts/gpu-check.sh bundle` built, or with --dry-run on a CPU machine
from a CPU bundle (`gpu-check.sh bundle --cpu`), where the same steps run on the flex backend
with tiny shapes so every line of this script is exercised in CI.

    python3 gpu_check.py --bundle DIR --out gpu-check.json [--dry-run] [--budget-s 480]

Steps, each with its own time limit, all written to one JSON file:

1. probe: GPU, driver, CUDA toolkits, the NVRTC that will load, CUDA_PATH, glibc;
2. backend agreement, cuda vs ndarray on tiny models (logits, loss, gradients of a training
   step; the pruning stage's losses, gradients of all three groups and its masks after two
   steps): the `backends` test binary, which runs every backend it was built with against
   ndarray (cuda's f32 matmuls may run as TF32: its bounds are looser, see backends.rs);
3. bf16-mixed vs f32 over 20 training steps (and layer checkpointing vs none): the
   `compute_settings` test binary, reading the tiny-train fixture from the bundle's
   `fixtures/` (SHEARS_SHARED points there);
4. speed with random weights generated here: SmolLM2-135M forward (`shears bench forward`), its
   training step and pruning step at 8 x 2048 in bf16-mixed with layer checkpointing, and a
   Llama-3.2-1B-shaped training step at 2 x 2048 (with layer checkpointing when `shears plan`
   says the device's memory needs it); tokens/s and MFU against --peak-tflops (989, an H200's
   dense bf16); MFU counts 6 x matmul parameters x tokens/s;
5. peak device memory of the pruning step (nvidia-smi sampled every 100 ms, minus the memory in
   use before it started; peak RSS in a dry run) against `shears plan`'s estimate for the same
   settings.

The JSON file is rewritten after every step, and a step that raises is recorded as a failure
and the next one runs, so a run cut short (the device tool's time limit) still leaves what it
measured. Exit status 0 when every step passed, 1 otherwise; the JSON says which failed and why.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time


def text(output):
    """A child's captured output as str (a timeout hands back bytes, or None)."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


class Check:
    def __init__(self, a):
        self.a = a
        self.started = time.time()
        self.result = {"dry_run": a.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "host": platform.node(), "steps": {}, "failures": []}
        self.env = dict(os.environ)

    def left(self):
        return self.a.budget_s - (time.time() - self.started)

    def save(self):
        """Write the JSON so far (atomically: a kill never leaves half a file)."""
        self.result["seconds"] = round(time.time() - self.started, 1)
        tmp = self.a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1)
        os.replace(tmp, self.a.out)

    def phase(self, name, fn, *args):
        """Run one phase; an exception is a failure of that phase, and the check goes on."""
        try:
            fn(self, *args)
        except Exception as e:  # noqa: BLE001 - every failure is recorded, none ends the run
            import traceback
            self.result["failures"].append(f"{name}: {type(e).__name__}: {e}")
            self.result.setdefault("tracebacks", {})[name] = traceback.format_exc()[-4000:]
            print(f"[{time.time() - self.started:6.1f} s] {name}: {type(e).__name__}: {e}",
                  flush=True)
        self.save()

    def run(self, name, cmd, timeout, env=None):
        """Run cmd; record its status, time and output tail under steps[name]."""
        timeout = max(5, min(timeout, self.left()))
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               env=env or self.env, cwd=self.a.bundle)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", text(e.stdout), text(e.stderr)
        except OSError as e:  # a missing or non-executable binary
            rc, out, err = f"OSError: {e}", "", ""
        step = {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 2),
                "stdout_tail": out[-4000:], "stderr_tail": err[-4000:]}
        self.result["steps"][name] = step
        if rc != 0:
            self.result["failures"].append(f"{name}: exit {rc}")
        print(f"[{time.time() - self.started:6.1f} s] {name}: rc {rc} in {step['seconds']} s",
              flush=True)
        self.save()
        return step, out

    def bin(self, *rel):
        return os.path.join(self.a.bundle, *rel)


def probe(c):
    info = {"cuda_path": os.environ.get("CUDA_PATH"), "glibc": platform.libc_ver()[1]}
    # The test binaries read their fixtures (tiny-train) from the bundle, in the dry run too.
    c.env["SHEARS_SHARED"] = os.path.abspath(c.a.bundle)
    info["fixtures"] = sorted(os.listdir(c.bin("fixtures"))) if os.path.isdir(c.bin("fixtures")) \
        else "missing"
    info["cubecl_toml"] = os.path.isfile(c.bin("cubecl.toml"))
    if info["fixtures"] == "missing":
        c.result["failures"].append("probe: the bundle has no fixtures/ (the compute_settings tests need tiny-train)")
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True)
        info["gpu"] = q.stdout.strip()
    toolkits = sorted(d for d in os.listdir("/usr/local") if d.startswith("cuda")) \
        if os.path.isdir("/usr/local") else []
    info["toolkits"] = toolkits
    libs = subprocess.run(["bash", "-c", "ldconfig -p 2>/dev/null | grep -E 'libnvrtc|libcuda\\.so' "
                           "| awk '{print $NF}'"], capture_output=True, text=True)
    info["ldconfig"] = libs.stdout.split()
    if not c.a.dry_run:
        # NVRTC must not be newer than the driver: the toolkit matching it goes first.
        # CUDA_PATH as given, else the toolkit matching the driver (13.0), else /usr/local/cuda,
        # else the newest /usr/local/cuda-*.
        candidates = [os.environ.get("CUDA_PATH"), "/usr/local/cuda-13.0", "/usr/local/cuda",
                      *(os.path.join("/usr/local", d) for d in reversed(toolkits))]
        cuda = next((d for d in candidates if d and os.path.isdir(d)), None)
        if cuda:
            c.env["CUDA_PATH"] = cuda
            c.env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [os.path.join(cuda, "lib64"), c.env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
            info["cuda_path"] = cuda
            info["nvrtc_in_toolkit"] = sorted(
                f for f in os.listdir(os.path.join(cuda, "lib64")) if f.startswith("libnvrtc.so"))\
                if os.path.isdir(os.path.join(cuda, "lib64")) else []
        else:
            c.result["failures"].append("probe: no CUDA toolkit (CUDA_PATH, /usr/local/cuda*)")
        if not smi:
            c.result["failures"].append("probe: no nvidia-smi")
    c.result["probe"] = info
    print(json.dumps(info), flush=True)


def test_run(c, name, args, timeout, at_least=1):
    """Run a test binary; passing means at least `at_least` tests ran and none failed."""
    step, out = c.run(name, args, timeout)
    m = re.search(r"test result: ok\. (\d+) passed", out)
    if step["rc"] == 0 and not (m and int(m.group(1)) >= at_least):
        c.result["failures"].append(f"{name}: fewer than {at_least} test(s) matched")
        step["rc"] = "no test matched"
        c.save()


def tests(c):
    # The backends binary compares every backend it was built with against ndarray; the cuda
    # bundle's was built with cuda.
    # Both agreement tests: the training step and the pruning stage.
    test_run(c, "agreement", [c.bin("tests", "backends"), "every_backend_",
                              "--nocapture", "--test-threads", "1"], 150, at_least=2)


def compute_tests(c):
    dry = c.a.dry_run
    name = "bf16_mixed_tracks_f32_for_20_steps" if dry else "bf16_mixed_tracks_f32_on_cuda"
    test_run(c, "bf16_vs_f32", [c.bin("tests", "compute_settings"), name, "--nocapture",
                               "--test-threads", "1"], 120)
    name = "layer_checkpointing_gives_the_same_training" if dry else "layer_checkpointing_on_cuda"
    test_run(c, "checkpointing", [c.bin("tests", "compute_settings"), name,
                            "--nocapture", "--test-threads", "1"], 90)


def gen_model(c, preset, out):
    step, _ = c.run(f"generate {preset}", [sys.executable, c.bin("gen_random_llama.py"), out,
                                           "--preset", preset], 120)
    return step["rc"] == 0


class MemorySampler:
    """Peak used device memory (MiB) while running, sampled with nvidia-smi."""

    def __init__(self):
        self.peak, self.base, self.stop = 0, None, threading.Event()

    def used(self):
        q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        return int(q.stdout.split()[0])

    def __enter__(self):
        try:
            self.base = self.used()
        except Exception:  # noqa: BLE001 - no baseline: the peak is reported as unknown
            self.base = None
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()
        return self

    def loop(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.used())
            except Exception:
                pass
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def bench(c, name, model, extra, timeout):
    cmd = [c.bin("shears"), "--backend", c.backend, "bench", "prune", "--model", model, "--json",
           "--peak-tflops", str(c.a.peak_tflops), *extra]
    step, out = c.run(name, cmd, timeout)
    try:
        row = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    step["result"] = row
    return row


def peak_rss_of(cmd, timeout):
    probe_py = ("import resource, subprocess, sys, json;"
                "r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE);"
                "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
                " r.stdout.decode(errors='replace')[-4000:], r.stderr.decode(errors='replace')[-4000:]]))")
    out = subprocess.run([sys.executable, "-c", probe_py, *cmd], capture_output=True, text=True,
                         timeout=timeout)
    rc, kib, so, se = json.loads(out.stdout)
    return rc, kib * 1024, so, se


def write_target(model_dir, path):
    """The bench's pruning target for a model: two thirds of every width (as `bench prune`)."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    g = max(cfg["num_key_value_heads"] * 2 // 3, 1)
    r = max(cfg["num_attention_heads"] // cfg["num_key_value_heads"] - 1, 1)
    with open(path, "w") as f:
        f.write(f"num_hidden_layers = {max(cfg['num_hidden_layers'] * 2 // 3, 1)}\n"
                f"hidden_size = {max(cfg['hidden_size'] * 2 // 3, 1)}\n"
                f"num_attention_heads = {g * r}\nnum_key_value_heads = {g}\n"
                f"intermediate_size = {max(cfg['intermediate_size'] * 2 // 3, 1)}\n")
    return path


def speed_and_memory(c, tmp):
    """SmolLM2-135M shapes: forward, training step, pruning step and its peak memory."""
    dry = c.a.dry_run
    small = os.path.join(tmp, "small")
    if not gen_model(c, "tiny" if dry else "smollm2-135m", small):
        return
    seq, batch = (32, 2) if dry else (2048, 8)
    # SmolLM2-135M forward (batch 1 and 8).
    c.run("forward", [c.bin("shears"), "--backend", c.backend, "bench", "forward", "--model", small,
                      "--seq-len", str(seq), "--iters", "2", "--json"], 150)
    mixed = ["--precision", "bf16-mixed", "--checkpointing", "layers"]
    shape = ["--batch", str(batch), "--seq-len", str(seq), "--iters", "2"]
    bench(c, "train_step", small, ["--only", "plain", *shape, *mixed], 150)
    # The pruning step, with its peak memory.
    cmd = [c.bin("shears"), "--backend", c.backend, "bench", "prune", "--model", small, "--json",
           "--peak-tflops", str(c.a.peak_tflops), "--only", "masked", *shape, *mixed]
    t0 = time.time()
    if dry:
        rc, peak, out, err = peak_rss_of(cmd, max(5, min(150, c.left())))
        measured = peak
    else:
        with MemorySampler() as m:
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, env=c.env,
                                   timeout=max(5, min(150, c.left())), cwd=c.a.bundle)
            except subprocess.TimeoutExpired as e:
                p = subprocess.CompletedProcess(cmd, "timeout", e.stdout or "", e.stderr or "")
        rc, out, err = p.returncode, text(p.stdout), text(p.stderr)
        measured = (m.peak - m.base) * 2**20 if m.base is not None and m.peak else None
    step = {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 2),
            "stdout_tail": out[-4000:], "stderr_tail": err[-4000:]}
    c.result["steps"]["prune_step"] = step
    print(f"[{time.time() - c.started:6.1f} s] prune_step: rc {rc}", flush=True)
    c.save()
    if rc != 0:
        c.result["failures"].append(f"prune_step: exit {rc}")
        return
    row = json.loads(out.strip().splitlines()[-1])
    step["result"] = row
    # The plan's estimate for the same run.
    target = write_target(small, os.path.join(tmp, "target.toml"))
    plan, pout = c.run("plan", [c.bin("shears"), "plan", "--source", small, "--target", target,
                                "--json", "--batch", str(batch), "--seq-len", str(seq),
                                "--device", "cpu" if dry else "cuda", "--kernels", "generic",
                                *mixed], 30)
    if plan["rc"] == 0:
        est = json.loads(pout)["memory"]["total"]
        c.result["memory"] = {"measured_bytes": measured, "estimate_bytes": est,
                              "estimate_over_measured": est / measured if measured else None,
                              "measured_as": "peak RSS" if dry else "nvidia-smi used - before"}
        print(json.dumps(c.result["memory"]), flush=True)


def speed_1b(c, tmp):
    """A 1B-class training step: 2 x 2048 without checkpointing if `shears plan` says it fits
    the device (an H200: about 106 GiB), else with layer checkpointing (an H100's 80 GB)."""
    dry = c.a.dry_run
    big = os.path.join(tmp, "big")
    if not gen_model(c, "tiny" if dry else "llama-1b", big):
        return
    seq, b1 = (32, "1") if dry else (2048, "2")
    checkpointing = ["--checkpointing", "layers"]
    total = device_memory_bytes(c)
    if total:
        target = write_target(big, os.path.join(tmp, "target-1b.toml"))
        fit, fout = c.run("plan_1b", [c.bin("shears"), "plan", "--source", big, "--target", target,
                                      "--json", "--batch", b1, "--seq-len", str(seq),
                                      "--device", "cpu" if dry else "cuda", "--kernels", "generic",
                                      "--precision", "bf16-mixed", "--device-memory",
                                      f"{total // 10**6}MB"], 30)
        if fit["rc"] == 0 and json.loads(fout)["memory"]["fits"]:
            checkpointing = []
    c.result["train_step_1b_settings"] = {"batch": int(b1), "seq_len": seq,
                                          "device_memory_bytes": total,
                                          "checkpointing": "layers" if checkpointing else "none"}
    bench(c, "train_step_1b", big,
          ["--only", "plain", "--batch", b1, "--seq-len", str(seq),
           "--iters", "2", "--precision", "bf16-mixed", *checkpointing], 200)


def device_memory_bytes(c):
    """The device's total memory (nvidia-smi; the host's in a dry run), or None."""
    if c.a.dry_run:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
        return int(q.stdout.split()[0]) * 2**20
    except Exception:  # noqa: BLE001 - unknown: the step then runs with checkpointing
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default="gpu-check.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="flex backend, tiny shapes, peak RSS instead of device memory")
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()
    # Every step runs in the bundle, where cubecl finds its cubecl.toml (the kernel cache).
    a.bundle, a.out = os.path.abspath(a.bundle), os.path.abspath(a.out)
    c = Check(a)
    c.backend = "flex" if a.dry_run else "cuda"
    c.result["backend"] = c.backend
    c.result["budget_s"] = a.budget_s
    c.phase("probe", probe)
    # Correctness first, then the figures, then the compute-settings tests: if the time runs
    # out, what is lost is the part the CPU runs already cover best.
    with tempfile.TemporaryDirectory() as tmp:
        c.phase("agreement", tests)
        c.phase("speed_and_memory", speed_and_memory, tmp)
        c.phase("speed_1b", speed_1b, tmp)
        c.phase("compute_settings", compute_tests)
    c.save()
    print(f"wrote {a.out}; {len(c.result['failures'])} failure(s): {c.result['failures']}")
    sys.exit(1 if c.result["failures"] else 0)


if __name__ == "__main__":
    main()
