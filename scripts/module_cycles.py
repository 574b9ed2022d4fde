#!/usr/bin/env python3
"""Import cycles between the top-level modules of each crate of the workspace.

A module `a` depends on `b` when code of `a` (its file or folder, test modules left out) names
`crate::b` (in a `use`, grouped or not, or a path) or reaches `b` through `super::`. A cycle
means two modules that can only be understood together; the rule is a graph you can draw top
down. Prints each crate's cycles (strongly connected groups) and exits 1 when there is one.

    python3 scripts/module_cycles.py [--graph]
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CRATES = ["core", "models", "pruning", "data", "eval", "trainer", "cli", "tests"]
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def source_files(src):
    for d, _, files in os.walk(src):
        for f in files:
            if f.endswith(".rs"):
                yield os.path.join(d, f)


def module_of(src, path):
    """The module path of a file: ['ops', 'gemm'] for src/ops/gemm.rs, [] for lib.rs/main.rs."""
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    if rel in (["lib"], ["main"]):
        return []
    return rel


def without_tests(text):
    """The code before the first `#[cfg(test)]` (test modules sit at the end of a file), with
    comments removed (a doc link is not an import)."""
    i = text.find("#[cfg(test)]")
    text = text if i < 0 else text[:i]
    return re.sub(r"//[^\n]*", "", text)


def expand_use(tree):
    """Paths of a use tree: `a::{b, c::{d, e}}` -> a::b, a::c::d, a::c::e."""
    tree = tree.strip()
    i = tree.find("{")
    if i < 0:
        return [tree]
    head, inner = tree[:i], tree[i + 1:tree.rfind("}")]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    return [head + p for part in parts if part.strip() for p in expand_use(part)]


def references(text, here):
    """Top-level modules named by `text`, which belongs to module path `here`."""
    out = set()
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        paths.extend(expand_use(m.group(1)))
    paths.extend(m.group(0) for m in re.finditer(rf"\b(?:crate|super)(?:::{IDENT})+", text))
    for p in paths:
        segs = [s.strip() for s in p.replace(" ", "").split("::") if s.strip()]
        if not segs:
            continue
        if segs[0] == "crate":
            segs = segs[1:]
        elif segs[0] == "super":
            base = list(here)
            while segs and segs[0] == "super":
                base = base[:-1]
                segs = segs[1:]
            segs = base + segs
        elif segs[0] == "self":
            segs = list(here) + segs[1:]
        else:
            continue
        if segs:
            out.add(segs[0])
    return out


def graph(crate):
    src = os.path.join(ROOT, crate, "src")
    mods = set()
    edges = {}
    for f in source_files(src):
        m = module_of(src, f)
        if not m:
            continue
        mods.add(m[0])
    for f in source_files(src):
        m = module_of(src, f)
        if not m:
            continue
        with open(f, encoding="utf-8") as fh:
            text = without_tests(fh.read())
        for t in references(text, m):
            if t in mods and t != m[0]:
                edges.setdefault(m[0], set()).add(t)
    return mods, edges


def cycles(mods, edges):
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(mods):
        if v not in index:
            visit(v)
    return out


def main():
    show = "--graph" in sys.argv
    found = 0
    for crate in CRATES:
        if not os.path.isdir(os.path.join(ROOT, crate, "src")):
            continue
        mods, edges = graph(crate)
        cs = cycles(mods, edges)
        found += len(cs)
        for c in cs:
            links = [f"{a}->{b}" for a in c for b in sorted(edges.get(a, ())) if b in c]
            print(f"{crate}: cycle {' <-> '.join(c)} ({', '.join(links)})")
        if show:
            for a in sorted(edges):
                print(f"  {crate}: {a} -> {', '.join(sorted(edges[a]))}")
    print(f"{found} import cycle(s) between top-level modules")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
