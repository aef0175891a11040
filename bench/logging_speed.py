"""Figures 1 and 4: the logging step against a plain training step and against the floor, and
logging with the asynchronous HDF5 writer on vs no writer at all.

References, same model / batch / sequence length, interleaved in one process:
- train: forward + backward with every weight requiring grad (no optimizer step);
- floor: forward + backward with the weights frozen and activation gradients flowing (what
  any hook-based per-sample method needs at least).
LoGra logging is timed for hessian = none / kfac / raw at k = 16 and 64. With hessian="raw" the
Fisher update is a GEMM over buffered rows every `FISHER_GEMM_ROWS` rows, so raw variants are
timed in blocks of whole buffers (the periodic GEMM is inside every timed unit).

`python bench/logging_speed.py --model large --k 64 --hessian raw` runs one slice (used for the
before/after numbers of core changes).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import copy_model, floor_step_fn, interleaved, log_step_fn, make_bench, ratio, train_step_fn, write_json

import logra_dist
from logra_dist import LoGraConfig

SIZES = {"embedded": (8, 128), "large": (4, 128)}


def fisher_rows() -> int:
    from logra_dist.core import curvature as st

    return int(getattr(st, "FISHER_GEMM_ROWS", 1))


def logra_config(model: str, k: int, hessian: str, **kw: Any) -> LoGraConfig:
    # The embedded model's k_proj / v_proj are 32 wide (GQA): narrower than k=64, so they are
    # excluded at k=64 (LoGra refuses a rank above a layer's width; LogIX silently clamps it).
    exclude = [r"k_proj|v_proj"] if (model == "embedded" and k > 32) else []
    return LoGraConfig(k_in=k, k_out=k, hessian=hessian, exclude=exclude, **kw)


def flop_overhead(specs, tokens: int, batch: int, hessian: str) -> float:
    """Analytic extra FLOPs of logging over the floor's Linear-layer FLOPs (forward + input
    gradient, 4 N d_in d_out per layer): projections 2 N (d_in k_in + d_out k_out), per-sample
    products 2 N k_in k_out, and the statistics (raw: 2 B (k_in k_out)^2; kfac: 2 N (k_in^2 + k_out^2)).
    Attention, norms and the loss are left out of the floor, so the true ratio is lower."""
    base = sum(4 * tokens * s.d_in * s.d_out for s in specs)
    extra = sum(2 * tokens * (s.d_in * s.k_in + s.d_out * s.k_out + s.k_in * s.k_out) for s in specs)
    if hessian == "raw":
        extra += sum(2 * batch * s.width**2 for s in specs)
    elif hessian == "kfac":
        extra += sum(2 * tokens * (s.k_in**2 + s.k_out**2) for s in specs)
    return extra / base


def _time_model(model: str, ks: list[int], hessians: list[str], reps: int, raw_reps: int, tmp: Path) -> dict[str, Any]:
    b, t = SIZES[model]
    bench = make_bench(model, b, t)
    out: dict[str, Any] = {"model": bench.describe(), "variants": {}}
    train, floor = train_step_fn(copy_model(bench.model)), floor_step_fn(copy_model(bench.model))
    plain = [h for h in hessians if h != "raw"]
    loggers: dict[str, Any] = {}
    steps = {"train": train, "floor": floor}
    for k in ks:
        for h in plain:
            lg = logra_dist.attach(copy_model(bench.model), logra_config(model, k, h), tmp / f"{model}-{k}-{h}")
            loggers[f"k{k}-{h}"] = lg
            steps[f"k{k}-{h}"] = log_step_fn(lg)
    # The embedded model's steps take ~60 ms: time blocks of 4 so one scheduler hiccup does not
    # decide a round.
    res = interleaved(steps, bench.batches, reps=reps, warmup=1, block=4 if model == "embedded" else 1)
    for name in steps:
        if name in ("train", "floor"):
            continue
        lg = loggers[name]
        out["variants"][name] = {
            "k": lg.config.k_in,
            "hessian": lg.config.hessian,
            "width_D": lg.width,
            "flop_overhead_linear": flop_overhead(lg.specs, b * t, b, lg.config.hessian),
            "step_s": res["median_s"][name],
            "vs_floor": ratio(res, name, "floor"),
            "vs_train": ratio(res, name, "train"),
        }
        lg.close()
    out["train_step_s"], out["floor_step_s"] = res["median_s"]["train"], res["median_s"]["floor"]
    out["floor_vs_train"] = ratio(res, "floor", "train")
    if "raw" in hessians:
        block = max(1, math.ceil(fisher_rows() / b))
        for k in ks:  # one raw logger alive at a time: its Fisher is (k^2)^2 floats per layer
            lg = logra_dist.attach(copy_model(bench.model), logra_config(model, k, "raw"), tmp / f"{model}-{k}-raw")
            steps = {"floor": floor, "raw": log_step_fn(lg)}  # train: derived (blocks are long)
            res = interleaved(
                steps,
                bench.batches,
                reps=raw_reps,
                warmup=1,
                block=block,
                between=getattr(lg.accumulator, "flush", None),
            )
            out["variants"][f"k{k}-raw"] = {
                "k": k,
                "hessian": "raw",
                "width_D": lg.width,
                "block_steps": block,
                "flop_overhead_linear": flop_overhead(lg.specs, b * t, b, "raw"),
                "step_s": res["median_s"]["raw"],
                "vs_floor": ratio(res, "raw", "floor"),
                "vs_train": {
                    "ratio": ratio(res, "raw", "floor")["ratio"] * out["floor_vs_train"]["ratio"],
                    "derived": "vs_floor x floor_vs_train",
                },
            }
            out["variants"][f"k{k}-raw"]["commit"] = commit_cost(
                lg, b, tmp / f"{model}-{k}-commit.npz", res["median_s"]["raw"]
            )
            lg.close()
            del lg
    return out


def commit_cost(lg, batch_size: int, path: Path, step_s: float, max_bytes: int = 1 << 30) -> dict[str, Any]:
    """What the timed blocks leave out: a commit point, where the Logger lends its statistics to
    the writer thread (`Curvature.lend`: views, nothing copied on the main thread) which writes
    them to their own file and fsyncs it (`partial.write_stats`). Commits come after
    `flush_rows` rows, at most once per commit_seconds and per 1/COMMIT_SHARE x their cost, so
    amortized per step: cost x step_s / interval. Parts over `max_bytes`: one layer's part is
    written and scaled by the bytes. (Keys kept for report.py: flat_s = main-thread time.)"""
    from logra_dist.index.partial import write_stats
    from logra_dist.logger import COMMIT_SHARE

    t0 = time.perf_counter()
    parts, released = lg.accumulator.lend()
    lend_s = time.perf_counter() - t0
    total = sum(p.nbytes for p in parts)
    timed = parts if total <= max_bytes else parts[:1]
    t0 = time.perf_counter()
    write_stats(path, timed, 0)
    write_s = time.perf_counter() - t0
    released.set()
    path.unlink()
    scale = total / sum(p.nbytes for p in timed)
    cost = lend_s + write_s * scale
    interval = max(lg._commit_seconds, cost / COMMIT_SHARE, lg.config.flush_rows / batch_size * step_s)
    return {
        "flat_bytes": int(total),
        "flat_s": lend_s,
        "write_s": write_s * scale,
        "how": "measured" if timed is parts else f"one of {len(parts) - 1} layers timed, scaled x{scale:.0f}",
        "flush_rows": lg.config.flush_rows,
        "interval_s": interval,
        "amortized_per_step_s": cost * step_s / interval,
    }


def writes_on_off(model: str, ks: list[int], reps: int, tmp: Path) -> dict[str, Any]:
    """Figure 4: the asynchronous writer vs no writer (rows still computed, checked, counted)."""
    b, t = SIZES[model]
    bench = make_bench(model, b, t)
    out: dict[str, Any] = {"model": bench.describe(), "variants": {}}
    for k in ks:
        # flush_rows = one batch: every step's rows reach the disk inside the timed window
        cfg = logra_config(model, k, "none", flush_rows=b)
        on = logra_dist.attach(copy_model(bench.model), cfg, tmp / f"w-{model}-{k}-on")
        off = logra_dist.attach(copy_model(bench.model), cfg, tmp / f"w-{model}-{k}-off")
        off._writer.append = lambda rows, ids: None  # no writer: nothing encoded, queued or written
        res = interleaved({"on": log_step_fn(on), "off": log_step_fn(off)}, bench.batches, reps=reps + 2, warmup=1)
        t0 = time.perf_counter()
        on.close()  # drain the writer: what is still queued is part of the cost
        drain = time.perf_counter() - t0
        off.close()
        out["variants"][f"k{k}"] = {
            "k": k,
            "width_D": on.width,
            "on_step_s": res["median_s"]["on"],
            "off_step_s": res["median_s"]["off"],
            "on_vs_off": ratio(res, "on", "off"),
            "drain_at_close_s": drain,
            "rows_per_step": b,
            "bytes_per_step": b * on.width * 2,
        }
    return out


# -- profiling variant: manual timers on the real shapes ------------------------------------------
def _median_time(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def profile_phases(model: str, k: int, hessian: str, tmp: Path) -> dict[str, Any]:
    """Time each phase of the logging overhead on the activations and output gradients of one
    real batch (captured with plain hooks), replaying exactly the ops the hooks run:
    projection (x P_in^T, g P_out^T and the masks), per-sample products (bmm + row assembly),
    statistics (raw Fisher GEMM amortized per row / KFAC factors) and writes (main thread:
    finite check + fp16 encode + enqueue; writer thread: HDF5 append, overlapped)."""
    from logra_dist.index.codecs import codec_for

    encode_rows = codec_for("float16").encode

    b, t = SIZES[model]
    bench = make_bench(model, b, t)
    lg = logra_dist.attach(copy_model(bench.model), logra_config(model, k, hessian), tmp / f"p-{model}-{k}-{hessian}")
    batch = bench.batches[0]
    step = log_step_fn(lg)
    floor = floor_step_fn(copy_model(bench.model))
    res = interleaved({"log": step, "floor": floor}, bench.batches, reps=3, warmup=1)
    lg.close()
    model_copy = copy_model(bench.model)
    for p in model_copy.parameters():
        p.requires_grad_(False)
    model_copy.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    seen: dict[str, list[torch.Tensor]] = {}
    modules = dict(model_copy.named_modules())
    for spec in lg.specs:

        def fwd(mod, inputs, output, name=spec.name):
            seen[name] = [inputs[0].detach()]
            output.register_hook(lambda g, name=name: seen[name].append(g.detach()))

        modules[spec.name].register_forward_hook(fwd)
    from logra_dist.data import summed_lm_loss

    logits = model_copy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    summed_lm_loss(logits, batch.labels).backward()
    # as the hooks do: a mask without padding is not multiplied in
    mask = None if bool(batch.attention_mask.all()) else batch.attention_mask.reshape(b, -1, 1).float()
    masked = (lambda t: t) if mask is None else (lambda t: t * mask)
    proj = per_sample = stats = 0.0
    blocks = []
    for spec in lg.specs:
        x, g = seen[spec.name]
        p_in, p_out = lg.projection(spec.name)
        x3, g3 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])
        proj += _median_time(lambda: (masked(x3 @ p_in.T), masked(g3 @ p_out.T)))
        px, pg = masked(x3 @ p_in.T), masked(g3 @ p_out.T)
        per_sample += _median_time(lambda: torch.bmm(pg.transpose(1, 2), px))
        blocks.append(torch.bmm(pg.transpose(1, 2), px).reshape(b, -1))
        if hessian == "kfac":
            a, s = torch.zeros(spec.k_in, spec.k_in), torch.zeros(spec.k_out, spec.k_out)
            pxf, pgf = px.reshape(-1, spec.k_in), pg.reshape(-1, spec.k_out)
            stats += _median_time(lambda: (a.addmm_(pxf.T, pxf), s.addmm_(pgf.T, pgf)))
    rows = torch.cat(blocks, dim=1)
    per_sample += _median_time(lambda: torch.cat(blocks, dim=1))
    if hessian == "raw":  # the logger's own accumulator: one buffer of rows folded per call
        n = max(fisher_rows(), b)
        big = torch.randn(n, rows.shape[1])
        stats = _median_time(lambda: lg.accumulator.update_rows(big), reps=3) * b / n
    writes_main = _median_time(lambda: (torch.isfinite(rows).all(dim=1), encode_rows(rows)))
    import h5py

    arr = encode_rows(rows)
    with h5py.File(tmp / f"p-{model}-{k}-{hessian}.h5", "w") as h5:
        ds = h5.create_dataset(
            "grads",
            shape=(0, rows.shape[1]),
            maxshape=(None, rows.shape[1]),
            dtype=np.float16,
            chunks=(max(1, min(1024, (1 << 22) // (rows.shape[1] * 2))), rows.shape[1]),
        )

        def append() -> None:
            n0 = ds.shape[0]
            ds.resize(n0 + b, axis=0)
            ds[n0:] = arr

        writes_thread = _median_time(append)
    log_s, floor_s = res["median_s"]["log"], res["median_s"]["floor"]
    overhead = log_s - floor_s
    phases = {
        "projection": proj,
        "per_sample_products": per_sample,
        "statistics": stats,
        "writes_main_thread": writes_main,
    }
    return {
        "model": model,
        "k": k,
        "hessian": hessian,
        "log_step_s": log_s,
        "floor_step_s": floor_s,
        "measured_overhead_s": overhead,
        "phases_s": phases,
        "sum_of_phases_s": sum(phases.values()),
        "share_of_log_step": {n: v / log_s for n, v in phases.items()},
        "writes_writer_thread_s": writes_thread,
        "note": "phases replay the hooks' ops on one real batch; the writer-thread HDF5 append "
        "overlaps the next batch and is not part of the step",
    }


def run(
    quick: bool,
    out_dir: Path,
    models: list[str] | None = None,
    ks: list[int] | None = None,
    hessians: list[str] | None = None,
) -> dict[str, Any]:
    models = models or ["embedded", "large"]
    ks = ks or [16, 64]
    hessians = hessians or ["none", "kfac", "raw"]
    reps, raw_reps = (3, 2) if quick else (5, 3)
    out: dict[str, Any] = {"fisher_gemm_rows": fisher_rows(), "reps": reps, "raw_reps": raw_reps, "models": {}}
    with tempfile.TemporaryDirectory(prefix="logra-bench-") as tmp:
        for m in models:
            t0 = time.perf_counter()
            out["models"][m] = _time_model(m, ks, hessians, reps, raw_reps, Path(tmp))
            out["models"][m]["wall_s"] = time.perf_counter() - t0
        out["writes"] = writes_on_off("large" if "large" in models else models[0], ks, reps, Path(tmp))
        plan = [(k, "kfac") for k in ks] + ([] if quick else [(ks[-1], "raw")])
        out["profile"] = [profile_phases(models[-1], k, h, Path(tmp)) for k, h in plan]
    write_json(out_dir / "logging_speed.json", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="*", default=None, choices=list(SIZES))
    ap.add_argument("--k", nargs="*", type=int, default=None)
    ap.add_argument("--hessian", nargs="*", default=None, choices=["none", "kfac", "raw"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only-timing", action="store_true", help="skip writes and profile")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.only_timing:
        with tempfile.TemporaryDirectory(prefix="logra-bench-") as tmp:
            for m in a.model or ["large"]:
                r = _time_model(
                    m, a.k or [16, 64], a.hessian or ["none", "kfac", "raw"], a.reps, max(2, a.reps // 2), Path(tmp)
                )
                for name, v in r["variants"].items():
                    print(
                        f"{m} {name}: {v['step_s']:.3f}s  vs floor {v['vs_floor']['ratio']:.3f} "
                        f"[{v['vs_floor']['min']:.3f}, {v['vs_floor']['max']:.3f}]  "
                        f"vs train {v['vs_train']['ratio']:.3f}"
                    )
                    if v.get("commit"):
                        print(f"{m} {name} commit: {v['commit']}")
                print(f"{m} train {r['train_step_s']:.3f}s floor {r['floor_step_s']:.3f}s")
        return
    r = run(a.quick, Path(a.out), a.model, a.k, a.hessian)
    print(r)


if __name__ == "__main__":
    main()
