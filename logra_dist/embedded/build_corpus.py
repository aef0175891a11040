"""One-off builder of ``corpus.jsonl.gz`` from Python standard-library docstrings.

Run once (``python -m logra_dist.embedded.build_corpus``) and commit the output:
the docstrings differ between Python versions, so the committed file, not this
script, is what makes the embedded corpus identical everywhere. Collection runs
in a fresh isolated interpreter so that already-imported third-party packages
(which may monkeypatch stdlib classes) cannot leak into the corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib
import inspect
import io
import json
import pkgutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

# Modules that open windows/browsers, print on import, or are tests/tooling.
SKIP_TOP = {"idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "antigravity", "this"}
# Generated codec boilerplate: thousands of near-identical docstrings.
SKIP_PREFIXES = ("encodings.",)
MIN_CHARS = 80
MAX_CHARS = 1000
TARGET_DOCS = 2000


def _skip(modname: str) -> bool:
    parts = modname.split(".")
    if parts[0] in SKIP_TOP or modname.startswith(SKIP_PREFIXES):
        return True
    return any(p.startswith("_") or p in ("test", "tests", "idle_test") or p.startswith("test_") for p in parts)


def _quiet_import(modname: str) -> ModuleType | None:
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(modname)
    except (Exception, SystemExit):
        return None


def iter_module_names() -> list[str]:
    """Sorted importable public stdlib module names, packages expanded recursively."""
    found: set[str] = set()
    stack = sorted((n for n in sys.stdlib_module_names if not _skip(n)), reverse=True)
    while stack:
        name = stack.pop()
        mod = _quiet_import(name)
        if mod is None:
            continue
        found.add(name)
        path = getattr(mod, "__path__", None)
        if path:
            subs = [f"{name}.{m.name}" for m in pkgutil.iter_modules(path)]
            stack.extend(sorted((s for s in subs if not _skip(s)), reverse=True))
    return sorted(found)


def clean(doc: str | None) -> str | None:
    """Dedent, collapse whitespace, drop short docs, cut long ones at a space."""
    if not isinstance(doc, str):
        return None
    text = " ".join(inspect.cleandoc(doc).split())
    if len(text) < MIN_CHARS:
        return None
    if len(text) > MAX_CHARS:
        cut = text.rfind(" ", 0, MAX_CHARS + 1)
        text = text[: cut if cut > 0 else MAX_CHARS]
    return text


def _own_doc(obj: object) -> str | None:
    if inspect.isclass(obj):
        return obj.__dict__.get("__doc__")
    return getattr(obj, "__doc__", None)


def iter_docs(modname: str) -> list[tuple[str, str | None]]:
    """(source, raw docstring) for a module, its public classes/functions and their methods."""
    mod = sys.modules[modname]
    out: list[tuple[str, str | None]] = [(modname, mod.__doc__)]
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj):
            out.append((f"{modname}.{name}", _own_doc(obj)))
            for mname in sorted(obj.__dict__):
                member = obj.__dict__[mname]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if mname.startswith("_") or not callable(member):
                    continue
                if getattr(member, "__module__", None) not in (modname, None):
                    continue  # monkeypatched in by another package
                out.append((f"{modname}.{name}.{mname}", _own_doc(member)))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            out.append((f"{modname}.{name}", _own_doc(obj)))
    return out


def collect() -> list[tuple[str, str]]:
    """All cleaned, deduplicated (source, text) pairs, in sorted module order."""
    seen: set[str] = set()
    pool: list[tuple[str, str]] = []
    for modname in iter_module_names():
        for source, raw in iter_docs(modname):
            text = clean(raw)
            if text is not None and text not in seen:
                seen.add(text)
                pool.append((source, text))
    return pool


def collect_isolated() -> list[tuple[str, str]]:
    """Run :func:`collect` in a fresh ``python -I`` so only the stdlib is loaded."""
    code = (
        "import json, runpy, sys; ns = runpy.run_path(sys.argv[1], run_name='_corpus_collect'); "
        "open(sys.argv[2], 'w', encoding='utf-8').write(json.dumps(ns['collect']()))"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pool.json"
        subprocess.run(
            [sys.executable, "-I", "-c", code, __file__, str(out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        return [(s, t) for s, t in json.loads(out.read_text(encoding="utf-8"))]


def build(target: int = TARGET_DOCS) -> list[dict]:
    pool = collect_isolated()
    if len(pool) > target:  # evenly spaced, deterministic subsample over sorted sources
        pool = [pool[(i * len(pool)) // target] for i in range(target)]
    return [{"id": i, "source": s, "text": t} for i, (s, t) in enumerate(pool)]


def write(docs: list[dict], path: Path) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for doc in docs:
            gz.write((json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    from logra_dist.embedded.corpus import CORPUS_PATH, corpus_sha256

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CORPUS_PATH)
    ap.add_argument("--target", type=int, default=TARGET_DOCS)
    args = ap.parse_args(argv)
    docs = build(args.target)
    write(docs, args.out)
    chars = sum(len(d["text"]) for d in docs)
    print(
        f"wrote {len(docs)} docs ({chars} chars, {args.out.stat().st_size} bytes gz) to {args.out}; "
        f"python {sys.version.split()[0]}; sha256 {corpus_sha256(docs)}"
    )


if __name__ == "__main__":
    main()
