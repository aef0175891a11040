"""What each benchmark evaluates: sizes, seeds, and the methods, fixed before any result is seen.

Equal storage: every method in one rank group stores D numbers per training example:
LoGra with rank k on each of L layers stores L k^2, and the dense projection baselines are
given exactly that D. The full variant is what bench/results/ holds; `fast` shrinks counts
(subsets, seeds, queries), never the method list, so CI checks every code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from logra_dist.eval.methods import Method
from logra_dist.eval.tasks import TaskSpec


@dataclass
class Plan:
    spec: TaskSpec
    methods: list[Method]
    lds_queries: int  # first n of the query pool
    lds_subsets: int  # M random subsets ...
    lds_fraction: float  # ... of this fraction of the training set
    lds_seeds: list[int]
    brittle_queries: int  # first n of the query pool
    brittle_k: int  # examples removed per query
    brittle_methods: list[str]  # names of methods whose top-k is removed (plus "random")
    brittle_seeds: list[int]
    subset_seed: int = 0
    notes: list[str] = field(default_factory=list)


def _logra(init: str, hessian: str, k: int, **kw) -> Method:
    tag = {"raw": "", "kfac": "-kfac", "ekfac": "-ekfac", "none": "-nohess"}[hessian]
    extra = "".join(f"-{v}" for v in kw.pop("suffix", []))
    return Method(f"logra-{init}{tag}-k{k}{extra}", "logra", init=init, k=k, hessian=hessian, **kw)


def classification_methods(ranks: list[int], main_k: int, n_layers: int) -> list[Method]:
    methods = [
        Method("full-fisher", "full", hessian="raw"),  # exact (all layers jointly), reference
        Method("full-graddot", "full", hessian="none"),
        Method("logra-identity", "logra", init="identity", hessian="raw"),  # block-diagonal, full rank
        Method("logra-identity-kfac", "logra", init="identity", hessian="kfac"),
    ]
    for k in ranks:
        d = n_layers * k * k
        methods += [
            _logra("random", "raw", k),
            _logra("pca", "raw", k),
            _logra("random", "kfac", k),
            _logra("pca", "kfac", k),
            Method(f"graddot-k{k}", "logra", init="random", k=k, hessian="none"),
            Method(f"graddot-pca-k{k}", "logra", init="pca", k=k, hessian="none"),
            Method(f"dense-D{d}", "dense", dim=d, hessian="none"),
            Method(f"dense-fisher-D{d}", "dense", dim=d, hessian="raw"),
        ]
    k = main_k
    for init in ("random", "pca"):
        methods.append(_logra(init, "raw", k, fisher="true", suffix=["truefisher"]))
        methods.append(_logra(init, "raw", k, mode="relatif", suffix=["relatif"]))
        for c in (0.1, 10.0):
            methods.append(_logra(init, "raw", k, damping=c, suffix=[f"damp{c:g}"]))
    methods.append(Method(f"graddot-k{k}-relatif", "logra", init="random", k=k, hessian="none", mode="relatif"))
    for codec in ("float16", "int8", "int4", "sign"):  # row codecs: the same rows, stored compressed
        methods.append(_logra("pca", "raw", k, storage=codec, suffix=[codec]))
    return methods


def plan_for(benchmark: str, fast: bool) -> Plan:
    if benchmark in ("digits", "synthetic"):
        if benchmark == "digits":
            params = {"n_train": 1000, "n_query_pool": 200}
        else:
            params = {"n_train": 200, "n_query_pool": 60, "steps": 200}
        ranks, main_k = ([4] if fast else [2, 4, 8]), (4 if fast else 8)
        methods = classification_methods(ranks, main_k, n_layers=3)
        big = benchmark == "digits" and not fast
        return Plan(
            TaskSpec(benchmark, params),
            methods,
            lds_queries=100 if big else 30,
            lds_subsets=100 if big else 20,
            lds_fraction=0.5,
            lds_seeds=[0, 1, 2] if big else [0, 1],
            brittle_queries=20 if big else 4,
            brittle_k=20 if benchmark == "digits" else 10,
            brittle_methods=[
                "full-fisher",
                f"logra-random-k{main_k}",
                f"logra-pca-k{main_k}",
                f"graddot-k{main_k}",
                f"dense-fisher-D{3 * main_k * main_k}",
            ],
            brittle_seeds=[0, 1] if big else [0],
        )
    if benchmark == "lm":
        params = {"n_train": 120, "n_query_pool": 8, "steps": 40} if fast else {}
        k = 8 if not fast else 4
        methods = [
            _logra("random", "raw", k),
            _logra("pca", "raw", k),
            Method(f"graddot-k{k}", "logra", init="random", k=k, hessian="none"),
        ]
        return Plan(
            TaskSpec("lm", params),
            methods,
            lds_queries=0,
            lds_subsets=0,
            lds_fraction=0.5,
            lds_seeds=[],
            brittle_queries=3 if fast else 10,
            brittle_k=6 if fast else 40,
            brittle_methods=[m.name for m in methods],
            brittle_seeds=[0] if fast else [0, 1],
            notes=["LDS is not run on the LM: 2 cores allow about 4 retrainings a minute"],
        )
    raise ValueError(f"unknown benchmark {benchmark!r}; known: digits, synthetic, lm")
