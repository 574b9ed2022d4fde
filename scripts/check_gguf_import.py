#!/usr/bin/env python3
"""Check that Shears reads GGUF files made by llama.cpp's own converter as llama.cpp runs them.

For each HF model directory: llama.cpp's `convert_hf_to_gguf.py` (from the llama-cpp-python
0.3.36 sdist on PyPI, which vendors llama.cpp; cached in $SHEARS_CACHE) writes an f32 GGUF;
`shears score` on that file and llama.cpp itself (node-llama-cpp@3.21.1, through
scripts/llama_cpp_score.mjs) must give the same token ids and mean NLL within 2e-3. The HF
directory's own score is printed beside them: it differs where the converter drops what
llama.cpp does not run (a Qwen3 window, Gemma 3 layer kinds other than every sixth global).

    /tmp/pyenv/bin/python scripts/check_gguf_import.py DIR... [--shears PATH]

Needs torch, numpy and sentencepiece (the converter's imports) and node. Exit status 1 when a
check fails.
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SDIST = ("https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521"
         "aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz")
ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp"
TOLERANCE = 2e-3
TEXT = ("the cat sat on the mat and then they thought about it. fn main() { let mut x = 1; } "
        "Lorem ipsum dolor sit amet, the theorem follows. QED")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-4000:]}")
    return r.stdout


def converter(cache):
    """llama.cpp's converter and its gguf-py, unpacked from the sdist once."""
    dest = os.path.join(cache, "llama-cpp-python-0.3.36")
    script = os.path.join(dest, ROOT, "convert_hf_to_gguf.py")
    if not os.path.exists(script):
        os.makedirs(dest, exist_ok=True)
        archive = os.path.join(dest, "sdist.tar.gz")
        urllib.request.urlretrieve(SDIST, archive)
        with tarfile.open(archive) as t:
            keep = [m for m in t.getmembers() if m.name.startswith(
                (f"{ROOT}/convert_hf_to_gguf.py", f"{ROOT}/gguf-py/", f"{ROOT}/conversion/"))]
            t.extractall(dest, members=keep, filter="data")
        os.remove(archive)
    return script


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--shears", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "target")), "debug", "shears"))
    a = ap.parse_args()
    cache = os.environ.get("SHEARS_CACHE", os.path.expanduser("~/.cache/shears"))
    script = converter(cache)
    node_dir = os.path.join(cache, "node-llama-cpp")
    work = tempfile.mkdtemp(prefix="shears-gguf-import-")
    text = os.path.join(work, "text.txt")
    with open(text, "w") as f:
        f.write(TEXT)
    score = lambda m: json.loads(run([a.shears, "score", "--model", m, "--text-file", text,
                                      "--json"]))
    failures = []
    print(f"{'model':<20} {'HF':>10} {'shears':>10} {'llama.cpp':>10} {'|diff|':>9}")
    for m in a.models:
        name = os.path.basename(os.path.normpath(m))
        gguf = os.path.join(work, name + ".gguf")
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(script), "gguf-py"))
        run([sys.executable, script, m, "--outfile", gguf, "--outtype", "f32"], env=env)
        hf, ours = score(m), score(gguf)
        theirs = json.loads(run(["node", os.path.join(HERE, "llama_cpp_score.mjs"), gguf, text],
                                env=dict(os.environ, NODE_LLAMA_CPP_DIR=node_dir)))
        diff = abs(ours["mean_nll"] - theirs["mean_nll"])
        print(f"{name:<20} {hf['mean_nll']:>10.5f} {ours['mean_nll']:>10.5f} "
              f"{theirs['mean_nll']:>10.5f} {diff:>9.2e}")
        if ours["token_ids"] != theirs["token_ids"]:
            failures.append(f"{name}: token ids differ")
        if not diff <= TOLERANCE:
            failures.append(f"{name}: mean NLL differs by {diff:.2e} (> {TOLERANCE})")
        os.remove(gguf)
    if failures:
        sys.exit("GGUF import check failed:\n  " + "\n  ".join(failures))
    print("Shears reads llama.cpp's conversions as llama.cpp runs them")


if __name__ == "__main__":
    main()
