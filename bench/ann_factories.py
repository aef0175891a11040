"""FAISS factories on one index's sketched rows, in memory: build time, bytes, search time per
query batch and recall@10 after the exact re-rank, i.e. what the graph or the lists lose beyond
the sketch (`Flat` = the sketch's own loss).

    PYTHONPATH=. python bench/ann_factories.py INDEX 64 "HNSW32|efSearch=256,efSearch=512;Flat"

INDEX: a `bench/scale.py` index (e.g. /tmp/bench-scale/int8-1000000); the second argument is
the PCA sketch dim; then `;`-separated factories, each with `|`-separated comma lists of FAISS
search parameters. Rows are prepared as `ann build` prepares them (whitened, divided by
sqrt(self-influence): relatif), the PCA fitted on the same strided sample per shard; queries:
`bench/ann.queries(64)`. Exact scores from the full whitened rows in memory (4 GB at 1M x 1024).
NT (environment) = threads. One JSON line per (factory, params, C). A factory may carry build
parameters after "@" (applied before the rows are added), e.g. "HNSW32@efConstruction=80|efSearch=256".
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss
import numpy as np
import torch
from ann import queries

import logra_dist as ld
from logra_dist.index.ann import pca_matrix, sketch
from logra_dist.index.format import read_stats
from logra_dist.scoring.ann import TRAIN_ROWS, _Vectors


def prepared(index: str, d: int):
    store = ld.GradientStore(index)
    attrs, _ = read_stats(store.root / "stats.h5")
    vec = _Vectors(store, "selfinf", str(attrs["hessian"]), float(attrs["damping"]), store.width, 0)
    vec.matrix = None
    qw = vec.pre.whiten(torch.from_numpy(queries(64, store.width)).double()).float().numpy()
    shards = []
    for info in store.shards:
        x = np.empty((info.rows, store.width), np.float32)
        for a in range(0, info.rows, 65536):
            b = min(info.rows, a + 65536)
            x[a:b] = vec(torch.from_numpy(store[info.offset + a : info.offset + b]))
        picks = np.unique(np.linspace(0, info.rows - 1, min(info.rows, TRAIN_ROWS)).astype(np.int64))
        m = pca_matrix(x[picks], d, 0)
        exact = (torch.from_numpy(qw) @ torch.from_numpy(x).T).numpy()
        shards.append((info.offset, sketch(x, m), sketch(qw, m), exact, picks))
    return shards


def main() -> None:
    index, d, facs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(";")
    nt = int(os.environ.get("NT", "1"))
    torch.set_num_threads(nt)
    faiss.omp_set_num_threads(nt)
    shards = prepared(index, d)
    scores = np.concatenate([s[3] for s in shards], 1)
    top = np.argsort(-scores, 1)[:, :10]
    for fac in facs:
        fac, _, params = fac.partition("|")
        fac, _, build_params = fac.partition("@")
        idxs, build = [], 0.0
        for _, sx, _, _, picks in shards:
            t = time.perf_counter()
            ix = faiss.index_factory(d, fac, faiss.METRIC_INNER_PRODUCT)
            if build_params:
                faiss.ParameterSpace().set_index_parameters(ix, build_params)
            if not ix.is_trained:
                ix.train(sx[picks])
            ix.add(sx)
            build += time.perf_counter() - t
            idxs.append(ix)
        nbytes = sum(len(faiss.serialize_index(ix)) for ix in idxs)
        for p in params.split(",") if params else [""]:
            for ix in idxs:
                if p:
                    faiss.ParameterSpace().set_index_parameters(ix, p)
            for c in (100, 300):
                for ix in idxs:
                    inner = faiss.downcast_index(ix)
                    if hasattr(inner, "hnsw"):
                        inner.hnsw.efSearch = max(int(inner.hnsw.efSearch), c)
                ts = []
                for _ in range(3):
                    t = time.perf_counter()
                    labels = [ix.search(s[2], c)[1] for ix, s in zip(idxs, shards)]
                    ts.append(time.perf_counter() - t)
                cand = np.concatenate([lab + s[0] for lab, s in zip(labels, shards)], 1)
                got = np.take_along_axis(cand, np.argsort(-np.take_along_axis(scores, cand, 1), 1)[:, :10], 1)
                r = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, got)]))
                row = {"d": d, "factory": fac, "build_params": build_params, "params": p, "C": c}
                row.update(build_s=round(build, 1), bytes=nbytes)
                row.update(search_s=round(float(np.median(ts)), 4), recall=r, load=os.getloadavg()[0])
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
