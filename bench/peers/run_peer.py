"""Score one peer recipe (Kronfluence EKFAC/KFAC, TRAK, LogIX) for `logra_dist.eval`.

Runs in the bench venv only (`bash bench/setup_peers.sh`): `python bench/peers/run_peer.py
REQUEST.json`, written by logra_dist/eval/peers.py. The task (data, tokenization, batches) is
rebuilt from its spec with logra_dist.eval.catalog, the attributed model is loaded from its
save_pretrained folder, so every peer sees exactly the model, documents and query ids that
logra_dist's methods see. Output: `<out>` npz with `scores_<damping label>` (queries x train),
in logra_dist's sign convention (positive = the training example lowers the query loss), and
`scores.json` with the storage per example, the damping actually used and the cost.

Losses are the per-document loss SUMMED over tokens for training examples and queries alike (as
logra_dist logs them); every library gets per-document gradients of that loss.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from logra_dist.eval.catalog import cached_task
from logra_dist.eval.tasks import TaskSpec


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), reduction="none", ignore_index=-100)
    per_doc = tok.reshape(lb.shape).sum(1)
    return per_doc.sum() if reduce else per_doc


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


class LMAdapter:
    """The LM task as the peers see it: documents, per-document summed token loss."""

    def __init__(self, task):
        self.task = task

    def load(self, model_dir: str) -> torch.nn.Module:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(model_dir).eval()

    def collate(self, split: str, ids) -> dict:
        return self.task._collate(split, ids)

    def logits(self, model, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, logits, batch: dict, labels=None, reduce: bool = True) -> torch.Tensor:
        return summed_token_loss(logits, batch["labels"] if labels is None else labels, reduce)

    def sampled_labels(self, logits, batch: dict) -> torch.Tensor:
        """Labels drawn from the model per predicted token (the true Fisher)."""
        probs = F.softmax(logits[:, :-1].detach().float(), -1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(probs.shape[:2])
        labels = batch["labels"].clone()
        labels[:, 1:] = torch.where(batch["labels"][:, 1:] == -100, labels[:, 1:], drawn)
        return labels

    def mask(self, batch: dict):
        return batch["attention_mask"]

    keys = ("input_ids", "attention_mask", "labels")  # TRAK's batch: these tensors, in order


class ClassifierAdapter(LMAdapter):
    """The digits MLP: examples, summed cross-entropy; the model is a state dict (model.pt)."""

    def load(self, model_dir: str) -> torch.nn.Module:
        model = self.task.build_model()
        model.load_state_dict(torch.load(Path(model_dir) / "model.pt", weights_only=True))
        return model.eval()

    def collate(self, split: str, ids) -> dict:
        b = torch.as_tensor([int(i) for i in ids], dtype=torch.long)
        return {"x": self.task.x[split][b], "y": self.task.y[split][b]}

    def logits(self, model, batch: dict) -> torch.Tensor:
        return model(batch["x"])

    def loss(self, logits, batch: dict, labels=None, reduce: bool = True) -> torch.Tensor:
        per = F.cross_entropy(logits.float(), batch["y"] if labels is None else labels, reduction="none")
        return per.sum() if reduce else per

    def sampled_labels(self, logits, batch: dict) -> torch.Tensor:
        return torch.multinomial(F.softmax(logits.detach().float(), -1), 1)[:, 0]

    def mask(self, batch: dict):
        return None

    keys = ("x", "y")


def adapter_for(task):
    return LMAdapter(task) if task.name == "lm" else ClassifierAdapter(task)


class Ids(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = [int(i) for i in ids]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i]


# -- Kronfluence -----------------------------------------------------------------------------------
def kronfluence(req: dict, task, model, strategy: str) -> tuple[dict, dict]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask
    from kronfluence.utils.dataset import DataLoaderKwargs

    ad = adapter_for(task)

    class PeerTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            logits = ad.logits(model, batch)
            # sample: the true Fisher, labels drawn from the model (Kronfluence's default)
            labels = ad.sampled_labels(logits, batch) if sample else None
            return ad.loss(logits, batch, labels)

        def compute_measurement(self, batch, model):
            return ad.loss(ad.logits(model, batch), batch)

        def get_influence_tracked_modules(self):
            return linear_names(model)

        def get_attention_mask(self, batch):
            return ad.mask(batch)

    ktask = PeerTask()
    model = prepare_model(model, ktask)
    out = Path(req["workdir"]) / "kronfluence"
    analyzer = Analyzer(f"{task.name}-{strategy}", model, ktask, cpu=True, disable_tqdm=True, output_dir=str(out))
    # one collate_fn serves both data sets: each item carries its split
    loader = DataLoaderKwargs(collate_fn=_split_collate(ad))
    train, query = Tagged(Ids(req["train_ids"]), "train"), Tagged(Ids(req["query_ids"]), "query")
    bs = req["batch_size"]
    t0 = time.perf_counter()
    analyzer.fit_all_factors(
        "factors",
        train,
        per_device_batch_size=bs,
        dataloader_kwargs=loader,
        factor_args=FactorArguments(strategy=strategy),
        overwrite_output_dir=True,
    )
    fit = time.perf_counter() - t0
    scores, used = {}, {}
    t1 = time.perf_counter()
    for label in req["dampings"]:
        args = ScoreArguments() if label == "default" else ScoreArguments(damping_factor=float(label))
        used[label] = args.damping_factor
        name = f"scores_{label.replace('.', 'p').replace('-', 'm')}"
        analyzer.compute_pairwise_scores(
            name,
            "factors",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=len(query),
            per_device_train_batch_size=bs,
            dataloader_kwargs=loader,
            score_args=args,
            overwrite_output_dir=True,
        )
        scores[label] = analyzer.load_pairwise_scores(name)["all_modules"].double().numpy()
    n_params = sum(p.numel() for n, p in model.named_parameters() if any(n.startswith(m) for m in linear_names(model)))
    meta = {
        "library": "kronfluence 1.0.1",
        "storage_per_example": int(n_params),
        "storage_note": "nothing stored per example: training gradients are recomputed for every query batch",
        "damping_used": {k: (None if v is None else float(v)) for k, v in used.items()},
        "damping_convention": "absolute lambda added to the eigenvalues (library default 1e-8)",
        "cost": {"fit_seconds": round(fit, 2), "score_seconds": round(time.perf_counter() - t1, 2)},
        "fisher": "true Fisher (labels sampled from the model), Kronfluence's default",
    }
    return scores, meta


class Tagged(torch.utils.data.Dataset):
    def __init__(self, ids: Ids, split: str):
        self.ids, self.split = ids, split

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return (self.split, self.ids[i])


def _split_collate(ad):
    def fn(items):
        splits = {s for s, _ in items}
        if len(splits) != 1:
            raise RuntimeError(f"a batch mixes splits {splits}")
        return ad.collate(splits.pop(), [i for _, i in items])

    return fn


# -- TRAK ------------------------------------------------------------------------------------------
def trak(req: dict, task, model) -> tuple[dict, dict]:
    from trak import TRAKer
    from trak.gradient_computers import IterativeGradientComputer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector

    names = [n + ".weight" for n in linear_names(model)]
    ad = adapter_for(task)

    def as_batch(tensors) -> dict:
        return dict(zip(ad.keys, tensors))

    class PeerOutput(AbstractModelOutput):
        """f = minus the summed loss of the example (its log-likelihood); out-to-loss = 1. The
        gradients of f come from `Iterative` below, the only caller of get_output in traker 0.3.2."""

        def __init__(self):
            pass

        def get_output(self, model, weights, buffers, *tensors):
            raise NotImplementedError("f's gradients are computed by Iterative.compute_per_sample_grad")

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    class Iterative(IterativeGradientComputer):
        """Per-example gradients one example at a time (HF Llama under vmap is not reliable)."""

        def compute_per_sample_grad(self, batch):
            rows = []
            params = dict(model.named_parameters())
            for j in range(batch[0].shape[0]):
                one = as_batch([b[j : j + 1] for b in batch])
                model.zero_grad(set_to_none=True)
                (-ad.loss(ad.logits(model, one), one)).backward()
                rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
            return torch.stack(rows)

        def compute_loss_grad(self, batch):
            return torch.ones(batch[0].shape[0], 1)

    dim = int(req["dim"])
    grad_dim = sum(dict(model.named_parameters())[n].numel() for n in names)
    projector = BasicProjector(
        grad_dim, dim, seed=0, proj_type="normal", device="cpu", block_size=dim, dtype=torch.float32
    )
    out = Path(req["workdir"]) / "trak"
    n_train = len(req["train_ids"])
    t0 = time.perf_counter()
    traker = TRAKer(
        model,
        PeerOutput(),
        n_train,
        save_dir=str(out),
        load_from_save_dir=True,  # a fresh folder; False skips creating experiments.json
        device="cpu",
        gradient_computer=Iterative,
        projector=projector,
        proj_dim=dim,
        use_half_precision=False,
        grad_wrt=names,
    )
    traker.gradient_computer = Iterative(model, traker.task, grad_dim=grad_dim, dtype=torch.float32, device="cpu")
    traker.load_checkpoint(model.state_dict(), model_id=0)
    bs = req["batch_size"]
    for s in range(0, n_train, bs):
        b = ad.collate("train", req["train_ids"][s : s + bs])
        traker.featurize(batch=[b[k] for k in ad.keys], num_samples=len(b[ad.keys[0]]))
    fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores, used = {}, {}
    for label in req["dampings"]:
        lam = 0.0 if label == "default" else float(label)
        used[label] = lam
        traker.score_computer.lambda_reg = lam
        traker.saver.model_ids[0]["is_finalized"] = 0  # re-solve (X^T X + lambda I)^-1 for this lambda
        traker.finalize_features(model_ids=[0], del_grads=False)
        # traker 0.3.2: finalize_features frees a one-block projector's matrix and project() only
        # regenerates it (same seed, same matrix) when the model id changes
        traker.projector.model_id = -1
        name = f"q{label.replace('.', 'p').replace('-', 'm')}"
        traker.start_scoring_checkpoint(name, model.state_dict(), model_id=0, num_targets=len(req["query_ids"]))
        q = ad.collate("query", req["query_ids"])
        traker.score(batch=[q[k] for k in ad.keys], num_samples=len(req["query_ids"]))
        s = traker.finalize_scores(exp_name=name)  # (train, queries)
        scores[label] = np.asarray(s, dtype=np.float64).T
    meta = {
        "library": "traker 0.3.2",
        "storage_per_example": dim,
        "damping_used": used,
        "damping_convention": "lambda_reg added to Phi^T Phi (library default 0)",
        "cost": {"fit_seconds": round(fit, 2), "score_seconds": round(time.perf_counter() - t1, 2)},
        "fisher": "Phi^T Phi of the projected train gradients (TRAK, one checkpoint, no ensembling)",
    }
    return scores, meta


def main(path: str) -> int:
    req = json.loads(Path(path).read_text())
    torch.set_num_threads(int(req.get("threads", 1)))
    torch.manual_seed(0)
    task = cached_task(TaskSpec(req["spec"]["name"], req["spec"]["params"]))
    model = adapter_for(task).load(req["model_dir"])
    recipe = req["recipe"]
    if recipe.startswith("kronfluence-"):
        scores, meta = kronfluence(req, task, model, recipe.split("-", 1)[1])
    elif recipe == "trak":
        scores, meta = trak(req, task, model)
    elif recipe == "logix":
        from logix_peer import logix_scores

        scores, meta = logix_scores(req, task, model)
    else:
        raise SystemExit(f"unknown peer recipe {recipe!r}")
    np.savez(req["out"], **{f"scores_{k}": v for k, v in scores.items()})
    Path(req["out"]).with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1]))
