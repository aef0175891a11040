"""What the index identity costs (issue 12): the model fingerprint (once per attach), the
tokenizer fingerprint (once per job) and the per-sample data digests (every batch), each against
one LoGra logging step of the same model, measured in one process.

- model fingerprint: `engines.fingerprint.model_fingerprint` over the logged layers' weights
  (an exact integer hash of every element; one all-reduce when distributed, none here);
- data digests: `data.identity.samples_digest` of one batch's samples (blake2b of their ids,
  tokens and labels), the only identity work inside the logging loop;
- logging step: the public capture protocol at the default config (k=16, raw Fisher).

`python bench/fingerprint_overhead.py [--models embedded large] [--steps 8]` writes
bench/results/fingerprint_overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import log_step_fn, machine, make_bench, tokenizer, write_json

import logra_dist
from logra_dist import LoGraConfig
from logra_dist.cli.jobs import tokenizer_fingerprint
from logra_dist.data.identity import samples_digest
from logra_dist.data.samples import TokenizedSample
from logra_dist.engines import wrap
from logra_dist.engines.fingerprint import model_fingerprint
from logra_dist.session import select_layers

OUT = Path(__file__).parent / "results" / "fingerprint_overhead.json"


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, steps: int) -> dict:
    bench = make_bench(name, *({"embedded": (8, 128), "large": (4, 128)}[name]))
    config = LoGraConfig()
    _, modules = select_layers(wrap(bench.model), config)
    fingerprint_s = _median_time(lambda: model_fingerprint(bench.model, modules), 3)
    samples = [
        [TokenizedSample(int(i), ids.tolist(), ids.tolist()) for i, ids in zip(b.ids, b.input_ids)]
        for b in bench.batches
    ]
    digest_s = statistics.median(_median_time(lambda s=s: samples_digest(s), 20) for s in samples)
    with tempfile.TemporaryDirectory() as out:
        logger = logra_dist.attach(bench.model, config, Path(out) / "index")
        step = log_step_fn(logger)
        step(bench.batches[0])  # warmup
        step_times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(bench.batches[i % len(bench.batches)])
            step_times.append(time.perf_counter() - t0)
        logger.close()
    step_s = statistics.median(step_times)
    return {
        "model": bench.describe(),
        "logged_layers": len(modules),
        "model_fingerprint_s": fingerprint_s,
        "data_digest_per_batch_s": digest_s,
        "log_step_s": step_s,
        "model_fingerprint_in_steps": fingerprint_s / step_s,
        "data_digest_share_of_step": digest_s / step_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["embedded", "large"])
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    torch.manual_seed(0)
    tok_s = _median_time(lambda: tokenizer_fingerprint(tokenizer()), 3)
    results = {"machine": machine(), "tokenizer_fingerprint_s": tok_s, "models": {}}
    for name in args.models:
        results["models"][name] = r = measure(name, args.steps)
        print(
            f"{name}: {r['model']['parameters'] / 1e6:.1f}M params, {r['logged_layers']} layers: model fingerprint "
            f"{r['model_fingerprint_s'] * 1e3:.1f} ms (= {r['model_fingerprint_in_steps']:.2f} logging steps, once), "
            f"data digests {r['data_digest_per_batch_s'] * 1e6:.0f} us/batch "
            f"({100 * r['data_digest_share_of_step']:.3f}% of a {r['log_step_s'] * 1e3:.0f} ms step)"
        )
    print(f"tokenizer fingerprint: {tok_s * 1e3:.1f} ms once per job")
    write_json(OUT, results)


if __name__ == "__main__":
    main()
