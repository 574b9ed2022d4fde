#!/usr/bin/env python3
"""Functions longer than a limit (default 120 lines) and files longer than 600 lines, outside
tests, in the workspace's Rust sources (rustfmt layout: a function ends at the first `}` with
its own indentation).

    python3 scripts/long_fns.py [LIMIT] [--check]

With --check (CI), exit 1 when a function is over the limit (long files are only listed)."""
import re, sys, pathlib

args = [a for a in sys.argv[1:] if a != "--check"]
LIMIT = int(args[0]) if args else 120
long_fns = 0
root = pathlib.Path(__file__).resolve().parent.parent
crates = ["core", "models", "pruning", "data", "eval", "trainer", "cli", "tests/src"]
fn_re = re.compile(r"^(\s*)(pub(\([^)]*\))? )?(const )?(unsafe )?(async )?(extern \"C\" )?fn (\w+)")
for c in crates:
    for p in sorted((root / c).rglob("*.rs")):
        if "/tests/" in str(p.relative_to(root)) and not str(p).startswith(str(root / "tests/src")):
            continue
        lines = p.read_text().splitlines()
        # stop at the unit-test module
        end = next((i for i, l in enumerate(lines) if l.startswith("#[cfg(test)]")), len(lines))
        if end > 600:
            print(f"FILE {p.relative_to(root)}: {end} lines")
        i = 0
        while i < end:
            m = fn_re.match(lines[i])
            if m and not lines[i].rstrip().endswith(";"):
                indent = m.group(1)
                j = i
                while j < end and lines[j] != indent + "}":
                    j += 1
                n = j - i + 1
                if n > LIMIT:
                    long_fns += 1
                    print(f"FN {p.relative_to(root)}:{i+1} {m.group(8)}: {n} lines")
                i = j + 1 if j > i else i + 1
            else:
                i += 1
print(f"{long_fns} function(s) over {LIMIT} lines outside tests")
if "--check" in sys.argv and long_fns:
    sys.exit(1)
