"""Figure 2: LoGra logging vs the naive method at equal output dimension D.

Naive: full per-sample gradients of every logged weight (torch.func vmap(grad) over the batch),
flattened to P numbers per sample, then a dense Gaussian projection (P x D) to the same D as
LoGra's rows. Where the P x D matrix fits in memory the whole thing is measured; where it does
not, the projection is measured on a slice of P rows of the matrix and scaled linearly in P
(the GEMM is (B x P) @ (P x D): its cost is linear in P), and the result says so. LoGra, the
per-sample gradients and the projection run interleaved in the same rounds; the speedup is the
median over rounds of (gradients + projection) / LoGra.
Memory: the naive method must hold B x P per-sample gradients and the P x D matrix.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import copy_model, interleaved, log_step_fn, make_bench, ratio
from logging_speed import SIZES, logra_config

import logra_dist
from logra_dist.data import summed_lm_loss

# A dense projection matrix larger than this is not materialized; its GEMM is extrapolated.
MAX_MATRIX_BYTES = 3 << 30


def per_sample_grad_fn(model: torch.nn.Module, weight_names: list[str]):
    """(batch) -> {name: (B, d_out, d_in)} per-sample gradients of the summed token loss."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    logged = {n: params[n] for n in weight_names}

    def loss(lp, ids, labels):
        # Batches are unpadded (every sample is seq_len long), so no attention mask is needed.
        logits = functional_call(model, {**params, **lp}, (ids[None],), {"attention_mask": None}).logits
        return summed_lm_loss(logits, labels[None])

    f = vmap(grad(loss), in_dims=(None, 0, 0))
    return lambda batch: f(logged, batch.input_ids, batch.labels)


def run(quick: bool, models: list[str] | None = None, ks: list[int] | None = None) -> dict[str, Any]:
    models = models or ["embedded", "large"]
    ks = ks or [16, 64]
    out: dict[str, Any] = {"max_matrix_bytes": MAX_MATRIX_BYTES, "results": []}
    with tempfile.TemporaryDirectory(prefix="logra-naive-") as tmp:
        for m in models:
            b, t = SIZES[m]
            bench = make_bench(m, b, t)
            for k in ks:
                lg = logra_dist.attach(copy_model(bench.model), logra_config(m, k, "none"), Path(tmp) / f"{m}-{k}")
                names = [f"{s.name}.weight" for s in lg.specs]
                model = copy_model(bench.model)
                P = sum(s.d_in * s.d_out for s in lg.specs)
                D = lg.width
                psg = per_sample_grad_fn(model, names)

                def naive_grads(batch) -> None:
                    g = psg(batch)
                    torch.cat([g[n].reshape(b, -1) for n in names], dim=1)

                # projection phase: (B x P) @ (P x D), measured whole or on a slice of P rows
                rows_fit = max(1, MAX_MATRIX_BYTES // (D * 4))
                p_slice = min(P, rows_fit)
                gen = torch.Generator().manual_seed(0)
                proj = torch.randn(p_slice, D, generator=gen).div_(D**0.5)
                flat = torch.randn(b, p_slice, generator=gen)

                def naive_projection(batch, flat=flat, proj=proj) -> None:
                    torch.matmul(flat, proj)

                # All three phases in the same rounds, so one noisy stretch cannot favour a side.
                # (the bundled model's LoGra step takes ~20 ms: blocks of 4 calls per timed unit)
                reps = 2 if quick else (5 if m == "embedded" else 3)
                res = interleaved(
                    {"logra": log_step_fn(lg), "naive_grads": naive_grads, "naive_projection": naive_projection},
                    bench.batches,
                    reps=reps,
                    warmup=1,
                    block=4 if m == "embedded" else 1,
                )
                lg.close()
                del proj, flat
                scale = P / p_slice
                times = res["times_s"]
                per_round = [
                    (g + pr * scale) / lo
                    for lo, g, pr in zip(times["logra"], times["naive_grads"], times["naive_projection"])
                ]
                logra_s, grads_s = res["median_s"]["logra"], res["median_s"]["naive_grads"]
                proj_s = res["median_s"]["naive_projection"] * scale
                naive_s = grads_s + proj_s
                out["results"].append(
                    {
                        "model": m,
                        "k": k,
                        "P_logged_weights": P,
                        "D": D,
                        "batch_size": b,
                        "seq_len": t,
                        "logra_step_s": logra_s,
                        "naive_per_sample_grads_s": grads_s,
                        "naive_projection_s": proj_s,
                        "naive_step_s": naive_s,
                        "projection": "measured"
                        if p_slice == P
                        else f"extrapolated from a {p_slice} x {D} slice ({p_slice / P:.2%} of P), linear in P",
                        "speedup_per_sample": statistics.median(per_round),
                        "speedup_spread": [min(per_round), max(per_round)],
                        "grads_phase_vs_logra": ratio(res, "naive_grads", "logra"),
                        "memory_bytes": {
                            "naive_per_sample_grads": b * P * 4,
                            "naive_projection_matrix": P * D * 4,
                            "logra_projections": sum((s.k_in * s.d_in + s.k_out * s.d_out) * 4 for s in lg.specs),
                            "logra_rows": b * D * 4,
                        },
                    }
                )
                mem = out["results"][-1]["memory_bytes"]
                out["results"][-1]["memory_ratio_analytic"] = (
                    mem["naive_per_sample_grads"] + mem["naive_projection_matrix"]
                ) / (mem["logra_projections"] + mem["logra_rows"])
    return out


if __name__ == "__main__":
    import json
    import sys

    torch.set_num_threads(1)
    print(json.dumps(run("--quick" in sys.argv, ["embedded"] if "--embedded" in sys.argv else None), indent=1))
