"""Faults injected into real processes (SIGKILL, raise, stall, full disk, corrupted files, bad
input) and what must follow: resume logs every id exactly once with the statistics of an
uninterrupted run, and every damaged or foreign file is an error naming it. docs/reliability.md
has the table of these cases."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from reliability_helpers import (
    CLI_WORKER,
    MLP_WORKER,
    ROOT,
    assert_same_index,
    bare_ranks,
    committed_rows,
    fisher_matrices,
    mlp_args,
    mlp_worker,
    rows_by_id,
    run_mlp,
    torchrun,
)

import logra_dist as ld
from logra_dist.cli.main import main
from logra_dist.index.format import READABLE_VERSIONS as READABLE

N, NAN_ID = 40, 13
CONFIGS = {
    "raw": ["--nan-id", str(NAN_ID)],
    "kfac": ["--hessian", "kfac", "--nan-id", str(NAN_ID)],
    "pca": ["--init", "pca", "--k", "3", "--nan-id", str(NAN_ID)],
    "none3": ["--hessian", "none", "--k", "3"],
    "plain": [],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted single-process index per config (built in this process, once)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            out = tmp_path_factory.mktemp(f"ref-{name}")
            with pytest.warns(RuntimeWarning, match="non-finite") if "--nan-id" in CONFIGS[name] else _nothing():
                mlp_worker.run(mlp_args(out, *CONFIGS[name]))
            built[name] = out
        return built[name]

    return get


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- 1. resume after SIGKILL -----------------------------------------------------------------------
# (config, fault, what the killed run must have left on disk)
KILLS = [
    ("raw", "kill_after_batches:1", "partial, nothing committed"),
    ("raw", "kill_after_batches:5", "partial, rows committed, rows queued"),
    ("raw", "kill_in_commit:2", "partial, data fsynced past the record"),
    ("raw", "kill_in_build", "partial + half-built .h5.partial"),
    ("raw", "kill_before_manifest", "complete shard, no manifest"),
    ("kfac", "kill_in_commit:2", "partial, kfac statistics"),
    ("pca", "kill_after_batches:6", "partial, PCA projections saved"),
]


@pytest.mark.parametrize("name,fault,left", KILLS, ids=[f"{c}-{f}" for c, f, _ in KILLS])
def test_sigkill_then_resume_logs_every_id_once(tmp_path, reference, name, fault, left):
    out = tmp_path / "index"
    killed = run_mlp(out, *CONFIGS[name], fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    shards = out / "shards"
    assert not (out / "manifest.json").exists()
    if fault == "kill_after_batches:1":
        assert committed_rows(out) == 0
    elif fault == "kill_in_commit:2" and name == "raw":  # rows 9..19 written and fsynced, the record says 8
        assert committed_rows(out) == 8 and (shards / "rank-00000.partial" / "grads.bin").stat().st_size == 19 * 12 * 4
    elif fault == "kill_in_build":
        assert (shards / "rank-00000.h5.partial").exists() and committed_rows(out) == N - 1
    elif fault == "kill_before_manifest":  # the statistics a re-run finalize needs are beside the shard
        assert (shards / "rank-00000.h5").exists() and not (shards / "rank-00000.partial").exists()
        assert (shards / "rank-00000.stats.npz").exists() and "local_stats" not in h5py.File(shards / "rank-00000.h5")
    else:  # the writer thread may lag the kill: commits at 8 and 19 rows may or may not have landed
        assert committed_rows(out) in (0, 8, 19)
    if name == "pca":
        assert (shards / "pca_projections.npz").exists()
    # the same job without resume refuses to touch the earlier job's files
    with pytest.raises(ld.IndexFormatError, match=r"pass resume=True \(--resume\)"):
        mlp_worker.run(mlp_args(out, *CONFIGS[name]))
    if fault == "kill_after_batches:5":  # the command line, as a user would rerun it
        resumed = run_mlp(out, *CONFIGS[name], "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    else:
        with pytest.warns(RuntimeWarning, match=r"ids \[13\]") if "--nan-id" in CONFIGS[name] else _nothing():
            mlp_worker.run(mlp_args(out, *CONFIGS[name], "--resume"))
    assert sorted(os.listdir(shards)) == sorted(["rank-00000.h5"] + (["pca_projections.npz"] if name == "pca" else []))
    assert_same_index(out, reference(name))


def test_finalized_index_holds_no_per_rank_statistics(reference):
    """The per-rank statistics serve only a re-run finalize: gone once manifest.json exists, and
    not inside the shard either (its bytes are rows, ids and checksums)."""
    shards = reference("raw") / "shards"
    assert os.listdir(shards) == ["rank-00000.h5"]
    with h5py.File(shards / "rank-00000.h5") as f:
        assert sorted(f) == ["block_sums", "grads", "ids", "nonfinite_ids"]


def test_resume_of_a_finished_index_changes_nothing(tmp_path, reference):
    out = tmp_path / "index"
    shutil.copytree(reference("raw"), out)
    before = {p: (out / p).read_bytes() for p in ("shards/rank-00000.h5", "stats.h5", "manifest.json")}
    with pytest.warns(RuntimeWarning, match=r"ids \[13\]"):
        manifest = mlp_worker.run(mlp_args(out, *CONFIGS["raw"], "--resume"))
    assert manifest["total_rows"] == N - 1 and all((out / p).read_bytes() == b for p, b in before.items())
    assert_same_index(out, reference("raw"))
    (out / "manifest.json").unlink()  # finalized, then damaged: the statistics to re-finalize are gone
    with pytest.raises(
        ld.IndexFormatError,
        match=r"rank-00000\.h5: cannot re-run the finalize: the statistics of "
        r"this complete shard \(rank-00000\.stats\.npz",
    ):
        mlp_worker.run(mlp_args(out, *CONFIGS["raw"], "--resume"))


def test_kill_after_the_manifest_then_resume_only_cleans_up(tmp_path, reference):
    out = tmp_path / "index"
    killed = run_mlp(out, *CONFIGS["raw"], fault="kill_after_manifest")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(os.listdir(out / "shards")) == ["rank-00000.h5", "rank-00000.stats.npz"]
    manifest = (out / "manifest.json").read_bytes()
    assert_same_index(out, reference("raw"))  # already a complete index
    with pytest.warns(RuntimeWarning, match=r"ids \[13\]"):
        mlp_worker.run(mlp_args(out, *CONFIGS["raw"], "--resume"))
    assert os.listdir(out / "shards") == ["rank-00000.h5"] and (out / "manifest.json").read_bytes() == manifest


def test_commits_are_spaced_by_their_cost(tmp_path):
    """commit_seconds > 0: a commit waits until its last cost is <= 5% of the time since the last
    one; commit_seconds=0 commits at every flush_rows rows whatever the cost."""
    X, Y = mlp_worker.data(32)
    for seconds in (1e-9, 0):
        out = tmp_path / str(seconds)
        logger = ld.attach(
            mlp_worker.model(),
            mlp_worker.config(mlp_args(out, "--flush-rows", "4")),
            out,
            commit_seconds=seconds,
            asynchronous_writes=False,
        )
        record = out / "shards" / "rank-00000.partial" / "commit.npz"
        committed = []
        for step in range(8):
            ids = torch.arange(4 * step, 4 * step + 4)
            with logger.capture(ids):
                logger.backward(torch.nn.functional.cross_entropy(logger.model(X[ids]), Y[ids], reduction="sum"))
            committed.append(committed_rows(out))
            # the cost the next step sees: an hour after steps 2 and 3 (so 3 and 4 must not commit), else none
            logger._writer.last_commit_seconds, logger._snapshot_seconds = (3600.0 if 2 <= step <= 3 else 0.0), 0.0
        stats = sorted(p.name for p in record.parent.glob("stats-*.npz"))
        assert committed == ([4, 8, 12, 12, 12, 24, 28, 32] if seconds else [4 * (s + 1) for s in range(8)]), committed
        assert len(stats) == 1, stats  # the record's own; earlier ones deleted once replaced
        logger.close()


def test_torchrun_rank_killed_then_resumed_with_the_same_command(tmp_path):
    """CLI on the embedded tiny Llama, 2 ranks: SIGKILL rank 1 mid-epoch, torchrun tears the job
    down; a different world size is refused; the same command plus --resume completes the index,
    equal to an uninterrupted single-process run (rows are world-size independent)."""
    cfg = tmp_path / "logra.json"
    cfg.write_text(json.dumps({"k_in": 4, "k_out": 4, "flush_rows": 4, "storage_dtype": "float32"}))
    common = ["--max-samples", "24", "--batch-size", "4", "--max-length", "32", "--logra", str(cfg)]
    out, ref = tmp_path / "index", tmp_path / "ref"
    killed = torchrun(CLI_WORKER, "log", "--out", str(out), *common, fault="kill_after_batches:2@1")
    assert killed.returncode != 0 and (out / "shards" / "rank-00001.partial").is_dir(), killed.stderr[-3000:]
    with pytest.raises(ld.IndexFormatError, match=r"rank\(s\) \[1\], written by a job with more than 1 ranks"):
        main(["log", "--out", str(out), *common, "--resume"])
    resumed = torchrun(CLI_WORKER, "log", "--out", str(out), *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert main(["log", "--out", str(ref), *common]) == 0
    ids, _ = rows_by_id(out)
    assert ids.tolist() == list(range(24))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [12, 12] and manifest["world_size"] == 2
    assert_same_index(out, ref, rtol=1e-4, shards=False)


# -- 2. a failing rank never leaves the others waiting ----------------------------------------------
def test_rank_raising_under_torchrun_ends_the_job_nonzero(tmp_path):
    proc = torchrun(
        MLP_WORKER,
        "--out",
        str(tmp_path / "i"),
        fault="raise_after_batches:2@1",
        timeout=120,
        LOGRA_DIST_TIMEOUT_S="600",
    )
    assert proc.returncode != 0 and "injected failure" in proc.stderr
    assert proc.elapsed < 60, proc.elapsed


@pytest.mark.parametrize(
    "fault,timeout,expect",
    [
        ("raise_after_batches:2@1", "600", "Connection closed by peer"),  # a dead rank: noticed at once
        ("stall_after_batches:2@1", "4", "Timed out"),  # a live rank that stopped: the collective timeout
    ],
)
def test_peer_of_a_failed_rank_errors_within_bounded_time(tmp_path, fault, timeout, expect):
    """Bare processes (no launcher to kill the survivors): rank 0 must fail on its own."""
    procs = bare_ranks(MLP_WORKER, "--out", str(tmp_path / "i"), fault=fault, LOGRA_DIST_TIMEOUT_S=timeout)
    start = time.monotonic()
    try:
        _, err0 = procs[0].communicate(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode != 0 and expect in err0, err0[-3000:]
    assert elapsed < 45, elapsed


# -- 3. full disk ---------------------------------------------------------------------------------
@pytest.mark.parametrize("limit,where", [(3000, "while logging"), (6000, "while building the shard")])
def test_file_size_limit_fails_loudly_and_stays_resumable(tmp_path, reference, limit, where):
    out = tmp_path / "index"
    failed = run_mlp(out, *CONFIGS["none3"], fault=f"fsize:{limit}")
    assert failed.returncode == 1 and "write failed" in failed.stderr and "File too large" in failed.stderr, (
        failed.stderr[-3000:]
    )
    rows = committed_rows(out)  # 108 bytes a row: rows 25..28 cross 3000 bytes at the commit of row 32
    assert (
        rows == 24 if where == "while logging" else (rows == N and (out / "shards" / "rank-00000.h5.partial").exists())
    )
    assert not (out / "shards" / "rank-00000.h5").exists()
    mlp_worker.run(mlp_args(out, *CONFIGS["none3"], "--resume"))
    gi, gr = rows_by_id(out)
    wi, wr = rows_by_id(reference("none3"))
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_allclose(gr, wr, rtol=1e-5, atol=1e-6)


# -- 4. damaged or foreign files: an error naming the file and the problem --------------------------
@pytest.fixture(scope="module")
def two_rank_duplicates(tmp_path_factory):
    """A 2-rank index where both ranks logged every sample (a user who forgot to shard data)."""
    out = tmp_path_factory.mktemp("dups")
    procs = bare_ranks(MLP_WORKER, "--out", str(out), "--no-stride")
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _chunk_offset(shard: Path, dataset: str, chunk: int) -> int:
    with h5py.File(shard) as f:
        return f[dataset].id.get_chunk_info(chunk).byte_offset


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def _damage(case: str, index: Path, reference, dups: Path) -> None:
    shard = index / "shards" / "rank-00000.h5"
    if case == "truncated":
        os.truncate(shard, shard.stat().st_size // 2)
    elif case == "corrupt-header":
        _flip(shard, 2)
    elif case == "corrupt-ids":
        _flip(shard, _chunk_offset(shard, "ids", 0) + 3)
    elif case == "incomplete":
        with h5py.File(shard, "r+") as f:
            f.attrs["complete"] = False
    elif case == "missing":
        shard.unlink()
    elif case == "missing-unfinished":
        shard.unlink()
        (index / "shards" / "rank-00000.partial").mkdir()
    elif case in ("seed", "layers", "model"):
        shutil.copy(reference(case) / "shards" / "rank-00000.h5", shard)
    elif case == "world-size":
        shutil.copy(dups / "shards" / "rank-00001.h5", shard)
    elif case == "stray":
        shutil.copy(dups / "shards" / "rank-00001.h5", index / "shards")
    elif case == "no-manifest":
        (index / "manifest.json").unlink()
    elif case == "bad-manifest":
        text = (index / "manifest.json").read_text()
        (index / "manifest.json").write_text(text[: len(text) // 2])
    elif case == "old-format":
        m = json.loads((index / "manifest.json").read_text())
        (index / "manifest.json").write_text(json.dumps({**m, "format_version": 1}))
    elif case == "stats-corrupt":
        os.truncate(index / "stats.h5", 100)
    elif case == "stats-foreign":
        shutil.copy(reference("layers") / "stats.h5", index / "stats.h5")
    else:
        raise AssertionError(case)


DAMAGE = {
    "truncated": r"shards/rank-00000\.h5: not a readable HDF5 shard \(truncated or corrupted\?\)",
    "corrupt-header": r"shards/rank-00000\.h5: not a readable HDF5 shard",
    "corrupt-ids": r"shards/rank-00000\.h5: its ids do not match the fingerprint in the manifest",
    "incomplete": r"shards/rank-00000\.h5: shard is not marked complete",
    "missing": r"shards/rank-00000\.h5: shard listed in the manifest is missing$",
    "missing-unfinished": r"rank-00000\.h5: shard listed in the manifest is missing "
    r"\(unfinished \['rank-00000\.partial'\] "
    r"exist: the job did not finalize; rerun it with --resume\)",
    "seed": r"shards/rank-00000\.h5: written by another job: its config_rows is .*'seed': 1",
    "layers": r"shards/rank-00000\.h5: written by another job: its layout is",
    "model": r"shards/rank-00000\.h5: written by another job: its model is .*OtherMLP",
    "world-size": r"shards/rank-00000\.h5: written by another job: its world_size is '2', the manifest's is '1'",
    "stray": r"shards/rank-00001\.h5: a shard the manifest does not list",
    "no-manifest": r"manifest\.json: missing; .* is not a finalized LoGra index",
    "bad-manifest": r"manifest\.json: unreadable or incomplete manifest",
    "old-format": rf"manifest\.json: format version 1, this reader reads versions {', '.join(map(str, READABLE))}",
    "stats-corrupt": r"stats\.h5: unreadable statistics \(truncated or corrupted\?\)",
    "stats-foreign": r"stats\.h5: statistics of another layer layout",
}


class OtherMLP(torch.nn.Sequential):
    """Same layers as the worker's MLP, another model class."""


@pytest.fixture(scope="module")
def variants(reference, tmp_path_factory):
    """reference() extended with indexes of another seed, layer set and model class."""
    extra = {"seed": ["--seed", "1"], "layers": ["--include", "^[02]$"]}
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in ("seed", "layers", "model") and name not in built:
            out = tmp_path_factory.mktemp(f"var-{name}")
            net = OtherMLP(*mlp_worker.model()) if name == "model" else None
            mlp_worker.run(mlp_args(out, *extra.get(name, [])), net=net)
            built[name] = out
        return built.get(name) or reference(name)

    return get


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_or_foreign_index_is_an_error_naming_the_file(tmp_path, variants, two_rank_duplicates, case):
    index = tmp_path / "index"
    shutil.copytree(variants("plain"), index)
    _damage(case, index, variants, two_rank_duplicates)
    with pytest.raises(ld.IndexFormatError, match=DAMAGE[case]):
        ld.GradientStore(index)


def test_corrupted_rows_fail_their_checksum_when_read(tmp_path, reference):
    index = _copy(reference("none3"), tmp_path / "index")
    shard = index / "shards" / "rank-00000.h5"
    _flip(shard, _chunk_offset(shard, "grads", 1) + 5)  # one byte of rows 8..15
    with ld.GradientStore(index) as store:  # opening reads ids only
        np.testing.assert_array_equal(store[0:8], rows_by_id(reference("none3"))[1][:8])
        for read in (
            lambda: store[:],
            lambda: store[10:12],
            lambda: list(store.iter_chunks(16)),
            lambda: store.rows_for_ids([9]),
        ):
            with pytest.raises(ld.IndexFormatError, match=r"shards/rank-00000\.h5: rows 8\.\.16 fail their checksum"):
                read()


def test_duplicate_ids_across_shards(two_rank_duplicates):
    with pytest.raises(
        ld.IndexFormatError,
        match=r"ids logged more than once across shards, e\.g\. \[0, 1, 2, 3, 4\] "
        r"\(in \['rank-00000\.h5', 'rank-00001\.h5'\]\)",
    ):
        ld.GradientStore(two_rank_duplicates)


def test_scoring_with_a_model_whose_layers_differ(reference):
    wider = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    )
    with pytest.raises(ld.IndexFormatError, match="model's selected layers do not match the index layout"):
        ld.Scorer(wider, reference("none3"))
    assert all(p.requires_grad for p in wider.parameters())  # the failed scorer left the model as it was
    assert all(not m._forward_hooks for m in wider.modules())


# -- 5. bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("hessian", ["raw", "kfac"])
def test_nonfinite_sample_is_reported_and_left_out_of_rows_and_statistics(tmp_path, hessian):
    with pytest.warns(RuntimeWarning, match=r"1 sample\(s\) had non-finite gradients .* ids \[13\]"):
        manifest = mlp_worker.run(mlp_args(tmp_path / "nan", "--hessian", hessian, "--nan-id", "13"))
    assert manifest["nonfinite_total"] == manifest["shards"][0]["nonfinite_count"] == 1
    assert "nonfinite_ids" not in manifest and manifest["total_rows"] == N - 1
    with ld.GradientStore(tmp_path / "nan") as store:
        assert store.nonfinite_ids().tolist() == [13]
    assert manifest["samples_in_statistics"] == N - 1
    mlp_worker.run(mlp_args(tmp_path / "without", "--hessian", hessian, "--skip-id", "13"))
    gi, gr = rows_by_id(tmp_path / "nan")
    wi, wr = rows_by_id(tmp_path / "without")
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_allclose(gr, wr, rtol=1e-5, atol=1e-7)  # batches differ by one sample
    gf, wf = fisher_matrices(tmp_path / "nan"), fisher_matrices(tmp_path / "without")
    for key in wf:  # decomposed in float32 (core/curvature/finalize.py): V e V^T within ~10 eps32 ||F||
        np.testing.assert_allclose(gf[key], wf[key], rtol=1e-5, atol=1e-6 * np.abs(wf[key]).max(), err_msg=key)


def test_an_id_logged_twice_is_refused_at_capture(tmp_path):
    logger = ld.attach(mlp_worker.model(), mlp_worker.config(mlp_args(tmp_path)), tmp_path)
    X, Y = mlp_worker.data(8)
    for ids in (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([3, 3])):
        try:
            with logger.capture(ids):
                logger.backward(torch.nn.functional.cross_entropy(logger.model(X[ids]), Y[ids], reduction="sum"))
        except ValueError as e:
            assert re.search(r"rank 0: sample id\(s\) \[(1|3, 3)\] logged twice", str(e)), e
        else:
            assert ids.tolist() == [0, 1]
    logger.close()


def test_resume_refuses_another_config_or_model(tmp_path):
    args = mlp_args(tmp_path, "--flush-rows", "2")
    logger = ld.attach(mlp_worker.model(), mlp_worker.config(args), tmp_path, commit_seconds=0)
    X, Y = mlp_worker.data(4)
    with logger.capture(torch.arange(4)):
        logger.backward(torch.nn.functional.cross_entropy(logger.model(X), Y, reduction="sum"))
    logger.close()  # not finalized: the partial shard stays, 4 rows committed
    assert len(np.fromfile(tmp_path / "shards" / "rank-00000.partial" / "ids.bin", dtype="<i8")) == 4
    for other, net, msg in (
        (["--flush-rows", "2", "--seed", "1"], None, "written with another config"),
        (["--flush-rows", "2", "--k", "3"], None, "written with another layout"),
        (["--flush-rows", "2"], OtherMLP(*mlp_worker.model()), "written with another model"),
    ):
        with pytest.raises(ld.IndexFormatError, match=rf"rank-00000\.partial: {msg}"):
            mlp_worker.run(mlp_args(tmp_path, *other, "--resume"), net=net)
    assert mlp_worker.run(mlp_args(tmp_path, "--flush-rows", "2", "--resume"))["total_rows"] == N


def _cli_cases(tmp_path: Path) -> list[tuple[list[str], type, str]]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"storage_dtype": "int3"}))
    out = ["--out", str(tmp_path / "index")]
    return [
        (
            ["log", *out, "--max-length", "1000"],
            SystemExit,
            r"--max-length 1000 exceeds the context .*"
            r"\(max_position_embeddings=256\)",
        ),
        (["log", *out, "--batch-size", "0"], SystemExit, "--batch-size must be >= 1, got 0"),
        (["log", *out, "--max-samples", "0"], SystemExit, "--max-samples must be >= 1, got 0"),
        (["log", *out, "--logra", str(bad_cfg)], ld.ConfigError, r"storage_dtype='int3' is not one of"),
        (["log", *out, "--data", str(empty)], ValueError, r"empty\.jsonl'\]: no documents"),
        (
            ["log", *out, "--max-samples", "4", "--ranks", "no_such_layer=4,4"],
            ld.ConfigError,
            r"ranks pattern\(s\) \['no_such_layer'\] match no logged layer",
        ),
        (
            ["log", *out, "--max-samples", "4", "--include", "nothing_matches"],
            ld.ConfigError,
            r"include=\['nothing_matches'\] .* select no Linear/Conv1D layer",
        ),
        (["score", "--index", str(tmp_path / "nope"), "--queries", str(empty)], ValueError, "no documents"),
        (
            ["score", "--index", str(tmp_path / "nope"), "--queries", str(ROOT / "launch" / "example_queries.jsonl")],
            ld.IndexFormatError,
            r"nope/manifest\.json: missing",
        ),
    ]


def test_cli_rejects_bad_input_before_any_work(tmp_path):
    for argv, error, message in _cli_cases(tmp_path):
        with pytest.raises(error) as info:
            main(argv)
        assert re.search(message, str(info.value.code if error is SystemExit else info.value)), (argv, info.value)
        assert not (tmp_path / "index" / "shards").exists(), argv
    with pytest.raises(SystemExit):  # argparse: an unknown storage dtype never reaches the job
        main(["log", "--out", str(tmp_path / "index"), "--storage-dtype", "int3"])
    from logra_dist.cli.jobs import check_context, default_model_path  # `score` runs the same check

    with pytest.raises(SystemExit, match=r"--max-length 999 exceeds the context"):
        check_context(default_model_path(), 999)
    check_context(default_model_path(), 256)


def test_nothing_is_unpickled():
    """Files from elsewhere are only parsed: no pickle, no torch.load without weights_only=True,
    no np.load with allow_pickle=True (numpy's default refuses pickles)."""
    pattern = re.compile(
        r"\bimport (c?pickle|dill)\b|\bpickle\.loads?\(|joblib\.load\(|allow_pickle\s*=\s*True"
        r"|torch\.load\((?![^)]*weights_only=True)"
    )
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted((ROOT / "logra_dist").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_write_index_from_precomputed_rows_reads_back(tmp_path):
    from logra_dist.core.projection import LayerSpec
    from logra_dist.index.writer import write_index

    specs = [LayerSpec("a", "linear", 4, 4, 2, 3), LayerSpec("b", "linear", 4, 4, 3, 2)]
    cfg = ld.LoGraConfig(k_in=2, k_out=2, storage_dtype="float32", flush_rows=3)
    rows = np.random.default_rng(0).standard_normal((9, 12)).astype(np.float32)
    write_index(
        tmp_path,
        specs,
        cfg.to_json(),
        [[(np.arange(5), rows[:5])], [], [(np.arange(5, 7), rows[5:7]), (np.arange(7, 9), rows[7:])]],
    )
    with ld.GradientStore(tmp_path) as store:
        assert store.ids.tolist() == list(range(9)) and [s.rows for s in store.shards] == [5, 0, 4]
        np.testing.assert_array_equal(store[:], rows)
        np.testing.assert_array_equal(np.concatenate([c[2] for c in store.iter_chunks(2)]), rows)


def test_damaged_commit_record_is_an_error_naming_it(tmp_path):
    out = tmp_path / "index"
    killed = run_mlp(out, fault="kill_after_batches:3")
    assert killed.returncode == -9
    (out / "shards" / "rank-00000.partial" / "commit.npz").write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(
        ld.IndexFormatError,
        match=r"rank-00000\.partial/commit\.npz: unreadable commit record .* "
        r"delete .*rank-00000\.partial to log this rank again",
    ):
        mlp_worker.run(mlp_args(out, "--resume"))


def test_statistics_files_carry_how_they_were_made(tmp_path):
    """A commit's statistics file holds its parts, their row count and `meta` (the Fisher
    estimator a resume checks); files written before `meta` existed read as {}."""
    from logra_dist.index.partial import read_stats, write_stats

    parts = [np.arange(6.0).reshape(2, 3), np.ones(4, np.float32)]
    write_stats(tmp_path / "new.npz", parts, 7, {"fisher_estimator": {"kind": "true", "samples": 8}})
    rows, got, meta = read_stats(tmp_path / "new.npz")
    assert rows == 7 and meta == {"fisher_estimator": {"kind": "true", "samples": 8}}
    for a, b in zip(got, parts, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    with open(tmp_path / "old.npz", "wb") as f:  # the layout of earlier versions: no meta
        np.savez(f, rows=np.array(7, np.int64), **{f"part_{i}": p for i, p in enumerate(parts)})
    assert read_stats(tmp_path / "old.npz")[0] == 7 and read_stats(tmp_path / "old.npz")[2] == {}


def test_scoring_streams_check_every_row_they_serve(tmp_path, reference):
    """The scorer reads shards through its own stream: a flipped byte must fail it too, whether
    the damaged block lies inside a chunk, across two chunks, or at the end of a rank's range."""
    from logra_dist.index.stream import ChunkStream

    index = _copy(reference("none3"), tmp_path / "index")  # 40 rows, checksum blocks of 8 rows
    shard = index / "shards" / "rank-00000.h5"
    with ld.GradientStore(index) as store:
        clean = [len(ids) for _, ids, _, _ in ChunkStream(store, [(0, 40)], 5)]
        assert sum(clean) == 40
    _flip(shard, _chunk_offset(shard, "grads", 2) + 7)  # rows 16..23
    with ld.GradientStore(index) as store:
        for ranges, chunk in (([(0, 40)], 8), ([(0, 40)], 5), ([(0, 18)], 4), ([(20, 30)], 16)):
            with pytest.raises(ld.IndexFormatError, match=r"rank-00000\.h5: rows 16\.\.24 fail their checksum"):
                list(ChunkStream(store, ranges, chunk))
        assert sum(len(ids) for _, ids, _, _ in ChunkStream(store, [(0, 16), (24, 40)], 5)) == 32  # clean blocks
    scorer = ld.Scorer(mlp_worker.model(), index, mode="dot")
    X, Y = mlp_worker.data(3)
    with scorer.capture(torch.arange(3)):
        scorer.backward(torch.nn.functional.cross_entropy(scorer.model(X), Y, reduction="sum"))
    with pytest.raises(ld.IndexFormatError, match=r"rows 16\.\.24 fail their checksum"):
        scorer.topk(3)
    scorer.close()
