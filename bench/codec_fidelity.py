"""How much each row codec changes the scores: float32 rows against their int8, int4 and sign
encodings, on the embedded default (bundled tiny Llama and corpus).

    python bench/codec_fidelity.py --out bench/results/codec_fidelity.json [--train 1936 --queries 64]

One float32 logging job (statistics from full-precision rows, as every codec's job computes
them: tests/index/test_codecs.py checks that stats.h5 is bit-identical across codecs) and a
query index of held-out documents. Each codec's index holds the codec's encoding of exactly
those rows (what logging with `--storage-dtype CODEC` stores) with the same stats.h5. Per codec
and score mode: the mean over queries of the Spearman correlation of all training scores with
the float32 ones, top-10 recall (the share of float32's top-10 found in the codec's top-10),
and bytes per row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import logra_dist as ld  # noqa: E402
from logra_dist.cli.main import main as cli  # noqa: E402
from logra_dist.eval.metrics import spearman_rows  # noqa: E402
from logra_dist.index.codecs import codec_for  # noqa: E402
from logra_dist.index.writer import write_index  # noqa: E402

CODECS = ("float16", "bfloat16", "int8", "int4", "sign")
MODES = ("dot", "relatif")


def recall_at(ref: np.ndarray, got: np.ndarray, k: int) -> float:
    top_ref = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    top_got = np.argsort(-got, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_got)]))


def scores(index: Path, queries: Path, mode: str) -> np.ndarray:
    scorer = ld.Scorer(None, index, mode=mode, cache_self_influence=False)
    scorer.add_query_gradients(queries, share=False)
    out = scorer.scores()
    scorer.close()
    return out


def reencoded(src: Path, dst: Path, codec: str) -> int:
    """`src`'s float32 rows stored with `codec` (and its stats.h5); returns bytes per row."""
    with ld.GradientStore(src) as store:
        rows, ids, layout, config = store[:], store.ids, store.layout, store.config
    cfg = ld.LoGraConfig.from_dict({**config.to_dict(), "storage_dtype": codec})
    write_index(dst, layout, cfg.to_json(), [[(torch.from_numpy(ids), torch.from_numpy(rows))]])
    shutil.copy(src / "stats.h5", dst / "stats.h5")
    return codec_for(codec, layout).bytes_per_row(rows.shape[1])


def run(train: int, n_queries: int, work: Path) -> dict:
    corpus = work / "corpus.jsonl"
    from logra_dist.embedded import load_corpus

    docs = load_corpus()
    with corpus.open("w") as f:
        for d in docs[: train + n_queries]:
            f.write(json.dumps({"id": int(d["id"]), "text": d["text"]}) + "\n")
    held_out = work / "queries.jsonl"
    with held_out.open("w") as f:
        for d in docs[train : train + n_queries]:
            f.write(json.dumps({"id": int(d["id"]), "text": d["text"]}) + "\n")
    t0 = time.perf_counter()
    base = ["--no-wandb", "--storage-dtype", "float32"]
    assert cli(["log", "--data", str(corpus), "--max-samples", str(train), "--out", str(work / "f32"), *base]) == 0
    assert cli(["log", "--data", str(held_out), "--logra", str(work / "f32"), "--out", str(work / "q"), *base]) == 0
    logged = time.perf_counter() - t0
    ref = {m: scores(work / "f32", work / "q", m) for m in MODES}
    out = {"train_rows": train, "queries": n_queries, "logging_seconds": round(logged, 1), "codecs": {}}
    with ld.GradientStore(work / "f32") as store:
        out["D"] = store.width
        out["layers"] = len(store.layout)
        float32_bytes = codec_for("float32", store.layout).bytes_per_row(store.width)
    for codec in CODECS:
        nbytes = reencoded(work / "f32", work / codec, codec)
        entry = {
            "bytes_per_row": nbytes,
            "bytes_vs_float32": nbytes / float32_bytes,
            "bytes_vs_float16": nbytes / (2 * out["D"]),
        }
        for mode in MODES:
            got = scores(work / codec, work / "q", mode)
            entry[mode] = {
                "spearman_mean": float(np.mean(spearman_rows(ref[mode], got))),
                "spearman_min": float(np.min(spearman_rows(ref[mode], got))),
                "top10_recall": recall_at(ref[mode], got, 10),
                "top1_agreement": recall_at(ref[mode], got, 1),
            }
        out["codecs"][codec] = entry
        print(codec, json.dumps(entry), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/codec_fidelity.json")
    ap.add_argument("--train", type=int, default=1936)  # + 64 held-out queries = the 2000 documents
    ap.add_argument("--queries", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.train, args.queries, Path(tmp))
    result["command"] = f"python bench/codec_fidelity.py --train {args.train} --queries {args.queries}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
