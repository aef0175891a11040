"""torchrun worker for the distributed scorer tests (gloo, plain modules, real processes).

    torchrun --nproc_per_node 4 tests/scorer_worker.py log4 ROOT   # indexes logged on 4 ranks
    torchrun --nproc_per_node 2 tests/scorer_worker.py log2 ROOT   # indexes on 2 ranks, then score
    torchrun --nproc_per_node 3 tests/scorer_worker.py score ROOT  # score on 3 ranks
`score_phase(root)` also runs in a single process (world size 1) from the test itself. Every rank
saves what it got to ROOT/results/W<world>/<case>.rank<r>.npz; the test compares against numpy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scorer_helpers import GROUPS, MODES, Bilinear, TinyNet, capture_batches, capture_int, log_index, log_int_index

import logra_dist as ld
from logra_dist import comm
from logra_dist.engines.launch import destroy_distributed, exit_process
from logra_dist.index.stream import ChunkStream

QUERY_IDS = np.arange(1000, 1021)  # 21 queries: several query chunks
DUP_QUERY_IDS = np.arange(100, 107)
K = 12  # larger than the rows of most shards
BOTTOM_K = 6  # no near-tie at the 6th-lowest place in the test data (7 has one)
SMALL_BLOCK = 480  # forces query chunks of 4 (and top-k merges of 1 query)


def blocks(ids: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(ids, np.cumsum(sizes)[:-1])


def log4(root: Path) -> None:
    r = comm.rank()
    log_index(root / "idx4", blocks(np.random.default_rng(4).permutation(48), [20, 10, 14, 4])[r])
    log_int_index(root / "dup4", blocks(np.random.default_rng(5).permutation(30), [9, 8, 7, 6])[r])


def log2(root: Path) -> None:
    r = comm.rank()
    log_index(root / "idx2", blocks(np.random.default_rng(2).permutation(37), [23, 14])[r])
    log_index(root / "qidx", blocks(QUERY_IDS, [11, 10])[r])
    log_index(root / "tiny", [[500], [501]][r])


def save(root: Path, case: str, **arrays) -> None:
    out = root / "results" / f"W{comm.world_size()}"
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"{case}.rank{comm.rank()}.npz", **arrays)


def result_arrays(res: ld.TopKResult) -> dict[str, np.ndarray]:
    out = {"scores": res.scores, "train_ids": res.train_ids, "query_ids": res.query_ids}
    for name, sub in res.groups.items():
        out[f"{name}.scores"], out[f"{name}.train_ids"] = sub.scores, sub.train_ids
    for name, sub in [("", res), *((f"{n}.", g) for n, g in res.groups.items())]:
        if sub.bottom is not None:
            out[f"{name}bottom_scores"], out[f"{name}bottom_train_ids"] = sub.bottom.scores, sub.bottom.train_ids
    return out


def my_share(ids: np.ndarray) -> np.ndarray:
    """The caller distributes queries: interleaved, so ranks hold different counts and orders."""
    return ids[comm.rank() :: comm.world_size()]


def score_phase(root: Path) -> None:
    world = comm.world_size()
    for index in ("idx2", "idx4"):
        for mode in MODES:
            sc = ld.Scorer(TinyNet(), root / index, mode=mode, chunk_rows=5, block_bytes=SMALL_BLOCK)
            capture_batches(sc, my_share(QUERY_IDS)[::-1], batch=3)
            save(root, f"{index}-{mode}", **result_arrays(sc.topk(K, groups=GROUPS, bottomk=BOTTOM_K)))
            sc.close()
    # precomputed queries from a query index (no model), and a damping other than the index's,
    # written to the self-influence cache by this world size
    damping = {1: 0.25, 2: 0.5, 3: 0.75}[world]
    sc = ld.Scorer(None, root / "idx2", mode="relatif", damping=damping, chunk_rows=6)
    sc.add_query_gradients(root / "qidx")
    save(root, "idx2-relatif-qindex", damping=damping, **result_arrays(sc.topk(K)))
    sc.close()
    sc = ld.Scorer(None, root / "idx4", mode="cosine", chunk_rows=4, cache_self_influence=False)
    sc.add_query_gradients(ld.GradientStore(root / "qidx"))
    save(root, "idx4-cosine-nocache", **result_arrays(sc.topk(K)))
    sc.close()
    # exact ties: integer rows, duplicates spread over shards and chunks
    for mode in MODES:
        sc = ld.Scorer(Bilinear(), root / "dup4", mode=mode, chunk_rows=4, block_bytes=64)
        capture_int(sc, my_share(DUP_QUERY_IDS))
        save(root, f"dup4-{mode}", **result_arrays(sc.topk(9)))
        sc.close()
    # self-influence = diagonal of the pairwise dot-score matrix (training index as query index)
    sc = ld.Scorer(None, root / "idx2", mode="dot", chunk_rows=8)
    sc.add_query_gradients(root / "idx2")
    save(
        root,
        "selfinf",
        pairwise=sc.scores(),
        query_ids=np.sort(sc.store.ids),
        store_ids=sc.store.ids,
        selfinf=sc.train_self_influence(),
        selfinf_layers=sc.train_self_influence(per_layer=True),
    )
    sc.close()
    # fewer rows than ranks: a rank without rows still takes part in every collective
    sc = ld.Scorer(None, root / "tiny", mode="relatif")
    sc.add_query_gradients(root / "qidx")
    save(root, "tiny", **result_arrays(sc.topk(5)))
    sc.close()
    # human-readable output (rank 0 writes; other ranks get None)
    sc = ld.Scorer(None, root / "idx4", mode="relatif", chunk_rows=8)
    sc.add_query_gradients(root / "qidx")
    res = sc.topk(3, groups=GROUPS)
    sc.write_results(
        root / "out" / f"W{world}",
        res,
        query_text=lambda i: f"query {i} | text",
        train_text={i: f"train {i}" for i in range(48)},
    )
    sc.close()
    failure_phase(root)


def failure_phase(root: Path) -> None:
    """A read error on one rank: that rank raises it, every other rank raises naming it; no hang."""
    world = comm.world_size()
    sc = ld.Scorer(None, root / "idx4", mode="dot", chunk_rows=4)
    sc.add_query_gradients(root / "qidx")
    bad = world - 1
    original = ChunkStream._read
    if comm.rank() == bad:

        def broken(self, files, start, stop, stage):
            raise OSError(f"injected read failure at rows {start}..{stop}")

        ChunkStream._read = broken
    try:
        sc.topk(2)
        outcome = "no error"
    except OSError as e:
        outcome = f"OSError: {e}"
    except RuntimeError as e:
        outcome = f"RuntimeError: {e}"
    finally:
        ChunkStream._read = original
    sc.close()
    save(root, "failure", outcome=np.array(outcome), bad=bad)


def main() -> None:
    phase, root = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if phase == "log4":
            log4(root)
        elif phase == "log2":
            log2(root)
            comm.barrier()
            score_phase(root)
        elif phase == "score":
            score_phase(root)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        comm.barrier()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after a gloo group (pytorch#190489: SIGABRT at exit)
