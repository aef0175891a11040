"""LogIX (PyPI logix-ai 0.1.1, the LoGra authors' library) as a peer of logra_dist.eval.

Same use as bench/logix_compare.py: `add_lora` (random init, rank r on every Linear) gives
projected per-document gradients, `covariance` the raw projected Fisher per layer; influence is
`compute_influence_all` (dot mode, preconditioned) of the query log against the train log.
LogIX's default damping is 0.1 x the mean eigenvalue of each layer's covariance; a number is
an absolute lambda.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch


def logix_scores(req: dict, task, model) -> tuple[dict, dict]:
    import logix
    import yaml
    from logix.utils import get_logger
    from run_peer import adapter_for, linear_names

    ad = adapter_for(task)

    get_logger().setLevel(logging.WARNING)
    root = Path(req["workdir"]) / "logix"
    root.mkdir(parents=True, exist_ok=True)
    names = linear_names(model)
    rank = round((int(req["dim"]) / len(names)) ** 0.5)  # D = L r^2, logra_dist's D at k = r
    cfg = root / "logix.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "root_dir": str(root),
                "logging": {"flush_threshold": 1 << 30, "num_workers": 0, "log_dtype": "float32"},
                "lora": {"init": "random", "rank": rank},
            }
        )
    )
    run = logix.LogIX(project="peer", config=str(cfg))
    run.watch(model, name_filter=names)
    run.add_lora(name_filter=names)
    run.setup({"grad": ["log", "covariance"]})
    run.save(True)
    width = sum(m.logix_lora_B.weight.numel() for m in model.modules() if hasattr(m, "logix_lora_B"))
    bs = req["batch_size"]
    train_ids = [int(i) for i in req["train_ids"]]
    t0 = time.perf_counter()
    for s in range(0, len(train_ids), bs):
        ids = train_ids[s : s + bs]
        b = ad.collate("train", ids)
        with run(data_id=[str(i) for i in ids], mask=ad.mask(b)):
            model.zero_grad(set_to_none=True)
            ad.loss(ad.logits(model, b), b).backward()
    run.finalize()
    fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    run.eval()
    q_ids = [int(i) for i in req["query_ids"]]
    q = ad.collate("query", q_ids)
    with run(data_id=[f"q{i}" for i in q_ids], mask=ad.mask(q)):
        model.zero_grad(set_to_none=True)
        ad.loss(ad.logits(model, q), q).backward()
    query_log = run.get_log(copy=True)
    loader = run.build_log_dataloader(batch_size=64)
    scores, used = {}, {}
    for label in req["dampings"]:
        damping = None if label == "default" else float(label)
        used[label] = "0.1 x mean eigenvalue per layer" if damping is None else damping
        # logix-ai 0.1.1 caches the damped inverse at the FIRST damping it sees
        # (LogIXState.get_covariance_inverse_state): recompute it for each damping of the sweep
        run.state.covariance_inverse(damping=damping)
        res = run.compute_influence_all(query_log, loader, mode="dot", damping=damping)
        inf = res["influence"].double().numpy()
        order = {str(t): j for j, t in enumerate(res["tgt_ids"])}
        missing = [i for i in train_ids if str(i) not in order]
        if missing:
            raise RuntimeError(f"LogIX returned no score for {len(missing)} training ids, e.g. {missing[:3]}")
        scores[label] = inf[:, [order[str(i)] for i in train_ids]]
        if [str(s) for s in res["src_ids"]] != [f"q{i}" for i in q_ids]:
            raise RuntimeError("LogIX returned the queries in another order")
    meta = {
        "library": "logix-ai 0.1.1",
        "storage_per_example": int(width),
        "damping_used": used,
        "damping_convention": "absolute lambda per layer; default 0.1 x mean eigenvalue of each layer",
        "cost": {"fit_seconds": round(fit, 2), "score_seconds": round(time.perf_counter() - t1, 2)},
        "fisher": f"raw projected Fisher per layer (LoRA rank {rank}, random init)",
    }
    torch.set_grad_enabled(True)
    return scores, {k: v for k, v in meta.items()}


__all__ = ["logix_scores"]
