"""Growth curves of the index with the corpus: bytes, exact scan, ANN build / search + re-rank,
recall, scorer peak RSS, at 100k, 1M (and, with --rows 10000000, 10M) rows on this machine.

    PYTHONPATH=. python bench/scale.py --rows 100000 1000000 --out bench/results/scale.json
    PYTHONPATH=. python bench/scale.py --rows 100000 --candidates 100 --search-params efSearch=256 efSearch=512

Run it at normal priority (its timings are the point); `--search-params` are given at scoring,
one ANN run each, and every entry records the parameters in force, the result's info and a
per-batch phase profile (ann-search, ann-read, gemm) of the batches after the first.

Synthetic rows (`bench/ann.build_index`: D = 1024, 4 layers of 16 x 16, structured low-rank
rows, raw projected Fisher), int8 shards, 2 shards; `--embedded` adds the real embedded index
(the bundled tiny Llama and corpus, logged int8, its held-out documents as queries). Every
scoring figure comes from a fresh subprocess (`--worker`), so its peak RSS (VmHWM) is that
path's alone: the exact scan (`Scorer.topk`), and ANN (`Scorer.topk(ann=True)`: its first batch
loads the FAISS files, later batches reuse them; "seconds" is the median of those later
batches, the per-batch cost of a scorer serving many batches). Recall@k is against the exact
top-k of the same queries. Bytes per codec: shards of `--codec-rows` rows written with each
codec (bytes per row are exact; totals at N are bytes/row x N plus the ids and checksums).
10M rows at int8 need ~11 GB of disk plus the ANN files: the script checks free space first and
refuses a size that does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ann import build_index, queries, recall  # noqa: E402

import logra_dist as ld  # noqa: E402
from logra_dist.index.ann import read_record  # noqa: E402
from logra_dist.index.codecs import codec_for  # noqa: E402

LAYERS, SHARDS, WIDTH = 4, 2, 1024
CODEC_NAMES = ("float32", "float16", "int8", "int4", "sign")


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- workers: one scoring path per process, its peak RSS is its own ----------------------------
def peak_rss() -> int:
    """This process's peak RSS since its exec (VmHWM): ru_maxrss would also count the parent's
    memory at fork, which Linux carries across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    from logra_dist.tracking import Tracker

    torch.set_num_threads(args.threads)
    q = np.load(args.queries_file)
    tracker = Tracker("scale", progress=False)
    sc = ld.Scorer(None, args.index, mode=args.mode, tracker=tracker)
    sc.add_query_gradients(q, np.arange(len(q)))
    kw = {"ann": True, "candidates": args.candidates} if args.worker == "ann" else {}
    if args.worker == "ann" and args.search_params:
        kw["search_params"] = args.search_params[0]
    times, result = [], None
    for r in range(args.rounds + 1):  # the first: page cache, self-influence cache, ANN load
        if r == 1:
            tracker.times.clear()  # the profile: the later batches only
        t = time.perf_counter()
        result = sc.topk(args.k, **kw)
        times.append(time.perf_counter() - t)
    np.save(args.ids_out, result.train_ids)
    print(
        json.dumps(
            {
                "first_s": times[0],
                "seconds": float(np.median(times[1:])),
                "rounds": args.rounds,
                "peak_rss_bytes": peak_rss(),
                "profile_s_per_batch": {k: v / args.rounds for k, v in sorted(tracker.times.items())},
                "info": result.info,
            },
            default=str,
        )
    )
    sc.close()


def run_worker(kind: str, index: Path, qfile: Path, ids_out: Path, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--index", str(index), "--queries-file", str(qfile)]
    cmd += ["--ids-out", str(ids_out), "--k", str(args.k), "--rounds", str(args.rounds), "--mode", args.mode]
    cmd += ["--threads", str(args.threads)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_ann_timed(index: Path, factory: str, args) -> float:
    """`logra-dist ann build` in its own process (as a user runs it), timed."""
    cmd = [sys.executable, "-m", "logra_dist.cli.main", "ann", "build", str(index), "--factory", factory]
    cmd += ["--mode", args.mode]
    if args.sketch_dim:
        cmd += ["--sketch-dim", str(args.sketch_dim)]
    if args.sketch:
        cmd += ["--sketch", args.sketch]
    if args.build_params:
        cmd += ["--build-params", args.build_params]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"ann build failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t


# -- the curves --------------------------------------------------------------------------------
def codec_bytes(work: Path, rows: int) -> dict:
    out = {}
    for name in CODEC_NAMES:
        d = work / f"codec-{name}"
        if not (d / "manifest.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            build_index(d, rows, LAYERS, 1, storage=name)
        shard = d / "shards" / "rank-00000.h5"
        layout = ld.GradientStore(d).layout
        out[name] = {
            "bytes_per_row": codec_for(name, layout).bytes_per_row(WIDTH),
            "shard_bytes_per_row_on_disk": shard.stat().st_size / rows,
        }
    f16 = out["float16"]["shard_bytes_per_row_on_disk"]
    for v in out.values():
        v["vs_float16"] = round(v["shard_bytes_per_row_on_disk"] / f16, 4)
    return out


def check_disk(work: Path, rows: int, dim: int) -> None:
    need = rows * (1100 * 1.3 + dim * 4 + 300)  # int8 shards + ANN files (float vectors, HNSW graph, per-row sums)
    free = shutil.disk_usage(work).free
    if need > free:
        raise SystemExit(f"{rows} rows need about {need / 1e9:.1f} GB in {work}, {free / 1e9:.1f} GB free")


def one_size(rows: int, args, work: Path) -> dict:
    index = work / f"int8-{rows}"
    entry: dict = {"rows": rows}
    if not (index / "manifest.json").exists():
        check_disk(work, rows, args.sketch_dim or 256)
        shutil.rmtree(index, ignore_errors=True)
        t = time.perf_counter()
        build_index(index, rows, LAYERS, SHARDS, storage="int8")
        entry["index_build_s"] = round(time.perf_counter() - t, 1)
    entry["index_bytes"] = sum(p.stat().st_size for p in (index / "shards").glob("*.h5"))
    qfile = work / "queries.npy"
    np.save(qfile, queries(args.queries, WIDTH))
    entry["exact"] = run_worker("exact", index, qfile, work / "exact-ids.npy", args)
    exact_ids = np.load(work / "exact-ids.npy")
    print(json.dumps({"rows": rows, "exact": entry["exact"]}), flush=True)
    entry["ann"] = []
    for factory in args.factories:
        built = [read_record(p) for p in sorted((index / "shards").glob("*.ann"))]
        want = (factory, args.sketch_dim or 256, args.sketch, args.build_params)
        same = [(r.factory, r.sketch_dim, r.sketch, r.build_params) == want for r in built]
        reuse = args.reuse_ann and len(built) == SHARDS and all(same)
        build_s = None if reuse else build_ann_timed(index, factory, args)
        ann_bytes = sum(p.stat().st_size for p in (index / "shards").glob("*.ann"))
        for c, params in [(c, p) for p in args.search_params or [""] for c in args.candidates]:
            extra = {"candidates": c, **({"search-params": params} if params else {})}
            got = run_worker("ann", index, qfile, work / "ann-ids.npy", args, **extra)
            got.update(
                factory=factory,
                build_params=args.build_params,
                candidates=c,
                search_params=got["info"]["ann_search_params"],
                build_s=None if build_s is None else round(build_s, 1),
                ann_bytes=ann_bytes,
                recall=recall(exact_ids, np.load(work / "ann-ids.npy")),
                speedup=entry["exact"]["seconds"] / got["seconds"],
            )
            entry["ann"].append(got)
            print(json.dumps({"rows": rows, **got}), flush=True)
    return entry


def embedded(args, work: Path) -> dict:
    """The real embedded index: tiny Llama + bundled corpus, logged int8; held-out queries."""
    from logra_dist.cli.main import main as cli
    from logra_dist.embedded import load_corpus

    docs = load_corpus()
    train = len(docs) - args.queries
    corpus, held = work / "emb-corpus.jsonl", work / "emb-queries.jsonl"
    for path, part in ((corpus, docs[:train]), (held, docs[train:])):
        path.write_text("".join(json.dumps({"id": int(d["id"]), "text": d["text"]}) + "\n" for d in part))
    index, qidx = work / "emb-int8", work / "emb-q"
    if not (index / "manifest.json").exists():
        shutil.rmtree(index, ignore_errors=True)
        assert cli(["log", "--data", str(corpus), "--out", str(index), "--storage-dtype", "int8", "--no-wandb"]) == 0
    if not (qidx / "manifest.json").exists():
        shutil.rmtree(qidx, ignore_errors=True)
        assert cli(["log", "--data", str(held), "--logra", str(index), "--out", str(qidx), "--no-wandb"]) == 0
    with ld.GradientStore(qidx) as qs:
        np.save(work / "emb-q.npy", qs[:])
    width = ld.GradientStore(index).width
    entry = {"rows": train, "D": width, "index_bytes": disk_bytes(index / "shards")}
    entry["exact"] = run_worker("exact", index, work / "emb-q.npy", work / "exact-ids.npy", args)
    exact_ids = np.load(work / "exact-ids.npy")
    entry["ann"] = []
    for factory in ("HNSW32",):
        build_s = build_ann_timed(index, factory, args)
        got = run_worker("ann", index, work / "emb-q.npy", work / "ann-ids.npy", args, candidates=100)
        ann_bytes = sum(p.stat().st_size for p in (index / "shards").glob("*.ann"))
        got.update(factory=factory, candidates=100, build_s=round(build_s, 1), ann_bytes=ann_bytes)
        got["recall"] = recall(exact_ids, np.load(work / "ann-ids.npy"))
        entry["ann"].append(got)
    print(json.dumps({"embedded": entry}), flush=True)
    return entry


def table(result: dict) -> str:
    """The README table of a scale.json."""
    mb = 1 / 1e6
    lines = [
        "| rows | index MB (int8) | exact s / 64 q | exact peak RSS MB | factory params, C | ANN build s | ANN MB |"
        " ANN s / 64 q | speedup | recall@10 | ANN peak RSS MB |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    sizes = list(result["sizes"]) + (
        [{**result["embedded"], "rows": f"{result['embedded']['rows']} (embedded)"}] if "embedded" in result else []
    )
    for e in sizes:
        ex = e["exact"]
        head = f"| {e['rows']} | {e['index_bytes'] * mb:.0f} | {ex['seconds']:.2f} | {ex['peak_rss_bytes'] * mb:.0f} |"
        for a in e["ann"] or [{}]:
            if not a:
                lines.append(head + " not run | | | | | | |")
                continue
            build = "-" if a["build_s"] is None else f"{a['build_s']:.0f}"
            size = "-" if a.get("ann_bytes") is None else f"{a['ann_bytes'] * mb:.0f}"
            lines.append(
                head + f" {a['factory']} {a.get('search_params', '')}, {a['candidates']} | {build} | {size} |"
                f" {a['seconds']:.3f} | {ex['seconds'] / a['seconds']:.1f}x | {a['recall']:.3f} |"
                f" {a['peak_rss_bytes'] * mb:.0f} |"
            )
    codecs = result["codec_bytes"]
    lines += ["", "| codec | bytes / row (D = 1024) | shard bytes / row on disk | vs float16 |", "|---|---:|---:|---:|"]
    for name, c in codecs.items():
        lines.append(
            f"| {name} | {c['bytes_per_row']} | {c['shard_bytes_per_row_on_disk']:.0f} | {c['vs_float16']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=int, default=[100_000, 1_000_000])
    p.add_argument("--factories", nargs="*", default=["HNSW32"], help="none given: the exact scan only")
    p.add_argument("--candidates", nargs="+", type=int, default=[1000])
    p.add_argument("--sketch-dim", type=int, default=None)
    p.add_argument("--sketch", default="pca")
    p.add_argument(
        "--search-params",
        nargs="*",
        default=[],
        help="FAISS search parameters given at scoring (one ANN run each, e.g. efSearch=256 efSearch=1024); "
        "none: the files' own (HNSW: efSearch=512)",
    )
    p.add_argument("--build-params", default="", help='FAISS build parameters of `ann build`, e.g. "efConstruction=80"')
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mode", default="relatif")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--codec-rows", type=int, default=20_000)
    p.add_argument("--embedded", action="store_true")
    p.add_argument("--reuse-ann", action="store_true", help="keep ANN files of the same factory (build_s: null)")
    p.add_argument("--work", default="/tmp/bench-scale")
    p.add_argument("--out", default="bench/results/scale.json")
    # worker mode (one scoring path in this process)
    p.add_argument("--worker", choices=["exact", "ann"])
    p.add_argument("--index")
    p.add_argument("--queries-file")
    p.add_argument("--ids-out")
    p.add_argument("--table", metavar="JSON", help="print the README table of a scale.json and exit")
    args = p.parse_args()
    if args.table:
        return print(table(json.loads(Path(args.table).read_text())))
    if args.worker:
        args.candidates = args.candidates[0]
        return worker(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "PYTHONPATH=. python bench/scale.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "threads": args.threads},
        "disk_free_bytes": shutil.disk_usage(work).free,
        "D": WIDTH,
        "storage": "int8",
        "shards": SHARDS,
        "queries": args.queries,
        "k": args.k,
        "mode": args.mode,
        "codec_bytes": codec_bytes(work, args.codec_rows),
        "sizes": [],
    }
    out = Path(args.out)
    for rows in args.rows:
        result["sizes"].append(one_size(rows, args, work))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=float) + "\n")  # after each size: partial runs count
    if args.embedded:
        result["embedded"] = embedded(args, work)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
