"""Scale-out: 2-rank gloo equals one process, shards merge exactly, kill + resume and extension equal an
uninterrupted run, offloaded layers give the in-memory statistics, and every refusal is one line.

All on the embedded tiny-moe with a few hundred tokens of seq-len 64; subprocesses run single-threaded so
that 2 ranks on 2 cores do not oversubscribe.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from moeprof.cli import main
from moeprof.distributed import reducible
from moeprof.merge import MergeError, merge_stores
from moeprof.models import load_model
from moeprof.profile import checkpoint_path, profile
from moeprof.schema import Field
from moeprof.stats import STATISTICS, ProfileShape, TableAccumulator
from moeprof.store import open_store

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(model_id="moeprof/tiny-moe", seq_len=64, batch_size=2, trace_tokens=150, show_progress=False)
ARGS = ["--seq-len", "64", "--batch-size", "2", "--trace-tokens", "150"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run in-process profiles single-threaded, like the subprocesses: the same kernels, bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A JSONL file of distinct random documents (no two packed sequences alike)."""
    rng = random.Random(0)
    words = "expert router token layer sparse dense mass vector gate norm model shard rank merge store".split()
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) + str(rng.randrange(1000))
                                                           for _ in range(80))}) for _ in range(120)))
    return path


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-moe")


@pytest.fixture(scope="module")
def reference(tiny, data, tmp_path_factory) -> Path:
    """One uninterrupted single-process run over 512 tokens."""
    out = tmp_path_factory.mktemp("ref") / "one.h5"
    profile(*tiny, [data], out, max_tokens=512, **RUN)
    return out


def datasets(path) -> dict:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def assert_same_store(a, b, exact=False):
    """Every dataset equal: integers, booleans and strings exactly, floats to 1e-6 relative (or bit for bit)."""
    da, db = datasets(a), datasets(b)
    assert sorted(da) == sorted(db)
    for k in da:
        x, y = da[k], db[k]
        if x.dtype.kind == "f" and not exact:
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=k)
        elif k.startswith("abs_hist/") and k.endswith("/counts") and not exact:
            # |entry| bins of float activations: a 1e-7 relative difference moves an entry on a bin edge to the
            # neighbouring bin; every expert's total is exact, and the cumulative counts differ by a few at most
            np.testing.assert_array_equal(x.sum(-1), y.sum(-1), err_msg=k)
            assert np.abs(np.cumsum(x - y, axis=-1)).max() <= 2, k
        else:
            np.testing.assert_array_equal(x, y, err_msg=k)


def env1(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def cli_error(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- data parallel


def test_two_gloo_ranks_equal_one_process(reference, data, tmp_path):
    out = tmp_path / "dp.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moeprof",
           "profile", "tiny-moe", "--data", str(data), "--out", str(out), "--max-tokens", "512", *ARGS]
    proc = subprocess.run(cmd, env=env1(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote") == 1  # rank 0 alone reports (and writes)
    assert_same_store(reference, out)
    with h5py.File(out) as f, h5py.File(reference) as g:
        assert json.loads(f.attrs["data_shards"])[0]["fingerprint"] == json.loads(g.attrs["data_shards"])[0][
            "fingerprint"]
        assert f["trace/token_id"].shape == (150,)


@pytest.mark.parametrize("mode,message", [("raise", "rank 1 of 2 failed"), ("die", "stopped answering")])
def test_failing_rank_stops_the_others_without_a_store(data, tmp_path, mode, message):
    out = tmp_path / "dp.h5"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "scaleout_worker.py"), str(out), str(data), mode],
                              env=env1(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 2, results[0][1][-2000:]
    assert message in results[0][1] and "no store was written" in results[0][1]
    assert not out.exists()


# ------------------------------------------------------------------------------------------- shards, merge


def test_shards_merge_to_one_run(tiny, data, reference, tmp_path):
    parts = [profile(*tiny, [data], tmp_path / f"s{i}.h5", max_tokens=512, shard=(i, 2), **RUN).path
             for i in range(2)]
    merged = merge_stores(parts, tmp_path / "merged.h5")
    assert_same_store(reference, merged)
    with h5py.File(merged) as f:
        shards = json.loads(f.attrs["data_shards"])
    assert [s["shard"] for s in shards] == ["0/2", "1/2"] and sum(s["tokens"] for s in shards) == 512
    with pytest.raises(MergeError, match="same data"):  # a shard twice, or a shard and the whole run
        merge_stores([merged, parts[0]], tmp_path / "twice.h5")
    with pytest.raises(MergeError, match="same data"):
        merge_stores([reference, parts[1]], tmp_path / "twice.h5")


def test_merge_refuses_incompatible_stores(tiny, data, reference, tmp_path, capsys):
    grid = profile(*tiny, [data], tmp_path / "grid.h5", max_tokens=128, p_grid=(0.5, 0.9), **RUN).path
    types = profile(*tiny, [data], tmp_path / "types.h5", max_tokens=128, types=("i",), **RUN).path
    assert "different p-grid" in cli_error(capsys, "merge", reference, grid, "-o", tmp_path / "m.h5")
    assert "different activation types" in cli_error(capsys, "merge", reference, types, "-o", tmp_path / "m.h5")
    other = tmp_path / "other.h5"  # another model: the same file under another model name
    other.write_bytes(reference.read_bytes())
    with h5py.File(other, "r+") as f:
        f.attrs["model"] = "someone/else"
    assert "different model" in cli_error(capsys, "merge", reference, other, "-o", tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_merge_refuses_data_read_twice_under_other_source_lists(tiny, data, tmp_path):
    """Two sources of which only the first was read (its first 256 tokens) overlap a run over that source alone."""
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "unread words " * 50}) + "\n")
    two = profile(*tiny, [data, other], tmp_path / "two.h5", max_tokens=256, **RUN).path
    with h5py.File(two) as f:
        (entry,) = json.loads(f.attrs["data_shards"])
    assert list(entry["source_tokens"]) == [str(data.resolve())]  # the second source was never reached
    with pytest.raises(MergeError, match="same data"):
        merge_stores([reference_path(tiny, data, tmp_path), two], tmp_path / "m.h5")
    # the later part of the same source does not overlap: sequences 4..7 of one file merge with 0..3 of it
    later = profile(*tiny, [data], tmp_path / "later.h5", max_tokens=512, shard=(1, 2), **RUN).path
    merge_stores([two, later], tmp_path / "ok.h5")


def reference_path(tiny, data, tmp_path) -> Path:
    return profile(*tiny, [data], tmp_path / "first512.h5", max_tokens=512, **RUN).path


def test_merge_refuses_an_output_that_is_one_of_its_inputs(tiny, data, reference, tmp_path, capsys):
    a = tmp_path / "a.h5"
    a.write_bytes(reference.read_bytes())
    b = profile(*tiny, [data], tmp_path / "b.h5", max_tokens=128, shard=(1, 2), **RUN).path
    link = tmp_path / "link.h5"
    link.symlink_to(a)
    before = a.read_bytes()
    for out in (a, tmp_path / "." / "a.h5"):
        assert "is one of the inputs" in cli_error(capsys, "merge", a, b, "-o", out)
    assert "is one of the inputs" in cli_error(capsys, "merge", a, b, "-o", link, "--force")  # (a link asks it)
    assert "is one of the inputs" in cli_error(capsys, "merge", link, b, "-o", a)
    assert a.read_bytes() == before


def test_merge_of_an_incomplete_store_names_the_missing_dataset(tiny, data, reference, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "other words " * 80}) + "\n")
    b = profile(*tiny, [other], tmp_path / "b.h5", max_tokens=128, **RUN).path
    with h5py.File(b, "r+") as f:
        del f["routing/tokens"]
    err = cli_error(capsys, "merge", reference, b, "-o", tmp_path / "m.h5")
    assert "routing/tokens" in err and str(b) in err


def test_merge_p_grid_mismatch_prints_plain_numbers(tiny, data, reference, tmp_path, capsys):
    grid = profile(*tiny, [data], tmp_path / "grid.h5", max_tokens=128, p_grid=(0.5, 0.9), **RUN).path
    err = cli_error(capsys, "merge", reference, grid, "-o", tmp_path / "m.h5")
    assert "(0.5, 0.9)" in err and "np.float64" not in err


def test_shard_out_of_range_is_one_line(data, tmp_path, capsys):
    assert "shard index must be in 0..1" in cli_error(capsys, "profile", "tiny-moe", "--data", data, "--out",
                                                      tmp_path / "x.h5", "--shard", "2/2")
    assert "is not I/N" in cli_error(capsys, "profile", "tiny-moe", "--data", data, "--shard", "first")


# ------------------------------------------------------------------------------------------- resume


def test_killed_run_resumes_to_the_uninterrupted_store(tiny, data, tmp_path):
    out = tmp_path / "run.h5"
    ckpt = checkpoint_path(out)
    cmd = [sys.executable, "-m", "moeprof", "profile", "tiny-moe", "--data", str(data), "--out", str(out),
           "--max-tokens", "2048", "--checkpoint-every", "256", *ARGS]
    proc = subprocess.Popen(cmd, env=env1(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists(), "the run finished before it could be killed"
    with h5py.File(ckpt) as f:
        assert 0 < f.attrs["tokens"] < 2048
    profile(*tiny, [data], out, max_tokens=2048, resume=True, **RUN)
    assert not ckpt.exists()
    whole = profile(*tiny, [data], tmp_path / "whole.h5", max_tokens=2048, **RUN).path
    assert_same_store(whole, out, exact=True)


def test_a_rerun_without_resume_keeps_the_checkpoint_and_says_so(tiny, data, reference, tmp_path, capsys):
    from moeprof.store import StoreError

    out = tmp_path / "c.h5"
    ckpt = checkpoint_path(out)
    ckpt.write_bytes(reference.read_bytes())  # the checkpoint of an interrupted run (512 tokens done)
    err = " ".join(cli_error(capsys, "profile", "tiny-moe", "--data", data, "--out", out, "--max-tokens", 128,
                             *ARGS).split())
    assert f"{ckpt} holds an interrupted profile of {out} (512 tokens); continue it with --resume, or pass --force" in err
    with pytest.raises(StoreError, match="holds an interrupted profile"):
        profile(*tiny, [data], out, max_tokens=128, **RUN)
    assert ckpt.read_bytes() == reference.read_bytes() and not out.exists()
    assert main(["profile", "tiny-moe", "--data", str(data), "--out", str(out), "--max-tokens", "128", "--force",
                 *ARGS]) == 0  # the user asked to start over
    capsys.readouterr()
    assert out.exists() and not ckpt.exists()


def test_an_interrupted_run_names_its_checkpoint_and_the_flag_that_resumes_it(data, tmp_path, capsys, monkeypatch):
    import moeprof.profile as prof

    out = tmp_path / "i.h5"
    real, seen = prof.iter_batches, []

    def interrupted(*a, **k):
        for batch in real(*a, **k):
            seen.append(batch)
            if len(seen) == 3:  # two batches of 128 tokens done, a checkpoint every 64 tokens
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(prof, "iter_batches", interrupted)
    code = main(["profile", "tiny-moe", "--data", str(data), "--out", str(out), "--max-tokens", "1024",
                 "--checkpoint-every", "64", *ARGS])
    said = " ".join(capsys.readouterr().out.split())
    assert code == 130 and not out.exists() and checkpoint_path(out).exists()
    assert f"{checkpoint_path(out)} keeps the statistics of the first 256 tokens: rerun the same command with " \
           "--resume" in said, said


def test_raising_max_tokens_extends_a_finished_store(tiny, data, reference, tmp_path):
    out = tmp_path / "grow.h5"
    profile(*tiny, [data], out, max_tokens=256, **RUN)
    profile(*tiny, [data], out, max_tokens=512, resume=True, **RUN)
    assert_same_store(reference, out, exact=True)


def test_foreign_checkpoint_is_refused(reference, data, tmp_path, capsys):
    out = tmp_path / "r.h5"
    out.write_bytes(reference.read_bytes())
    err = cli_error(capsys, "profile", "tiny-moe", "--data", data, "--out", out, "--resume", "--max-tokens", 1024,
                    "--seq-len", 32, "--batch-size", 2, "--trace-tokens", 150)
    assert "other arguments" in err and "seq_len" in err
    assert "nothing to resume" in cli_error(capsys, "profile", "tiny-moe", "--data", data, "--out",
                                            tmp_path / "none.h5", "--resume")


def test_a_statistic_registered_later_is_merged_resumed_and_reduced_unchanged(tiny, data, tmp_path, monkeypatch):
    """What a new statistic (effective rank, say) gets for free: one registered class with a sum and a max field."""

    class PeakCount(TableAccumulator):
        key, group = "peak_count", "peak_count"
        STATE = (Field("n", ("L", "E"), "int64", "{name} vectors [layer, expert]", "vectors", "sum"),
                 Field("peak", ("L", "E"), "float64", "largest |entry| of {name} [layer, expert]", "units", "max"))

        def add(self, obs):
            if obs.type == self.type and obs.vectors is not None and obs.expert_ids.numel():
                ids = obs.expert_ids.reshape(-1).long().to(self.device)
                self.n[obs.layer].index_add_(0, ids, torch.ones_like(ids))
                peak = obs.vectors.abs().amax(-1).double().to(self.device)
                self.peak[obs.layer] = torch.maximum(
                    self.peak[obs.layer], torch.zeros_like(self.peak[obs.layer]).scatter_reduce_(0, ids, peak, "amax"))

    monkeypatch.setitem(STATISTICS, PeakCount.key, PeakCount)
    assert reducible(PeakCount.empty(ProfileShape(2, 2, (0.9,)), "i"))  # so the data-parallel reduction covers it
    whole = profile(*tiny, [data], tmp_path / "whole.h5", max_tokens=256, **RUN).path
    parts = [profile(*tiny, [data], tmp_path / f"s{i}.h5", max_tokens=256, shard=(i, 2), **RUN).path
             for i in range(2)]
    merged = merge_stores(parts, tmp_path / "merged.h5")
    assert_same_store(whole, merged)
    grown = tmp_path / "grown.h5"
    profile(*tiny, [data], grown, max_tokens=128, **RUN)
    profile(*tiny, [data], grown, max_tokens=256, resume=True, **RUN)
    assert_same_store(whole, grown, exact=True)
    with h5py.File(whole) as f:
        assert f["peak_count/u/n"][()].sum() > 0 and f["peak_count/u/peak"][()].max() > 0


# ------------------------------------------------------------------------------------------- offload


def test_offloaded_layers_give_the_in_memory_statistics(data, reference, tmp_path):
    model, tok = load_model("tiny-moe", device="auto", max_memory={"cpu": "600KB"},
                            offload_folder=tmp_path / "offload")
    assert "disk" in set(model.hf_device_map.values())
    out = profile(model, tok, [data], tmp_path / "off.h5", max_tokens=512, **RUN).path
    assert_same_store(reference, out)


def test_merge_keeps_the_models_parameters_and_router(qwen2_moe, tmp_path, capsys):
    folder, data, whole = qwen2_moe
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, s in enumerate(shards):
        assert main(["profile", str(folder), "--data", str(data), "--out", str(s), "--seq-len", "16",
                     "--max-tokens", "32", "--batch-size", "1", "--types", "i", "--shard", f"{i}/2"]) == 0
    assert main(["merge", *map(str, shards), "-o", str(tmp_path / "m.h5")]) == 0
    with open_store(whole) as a, open_store(tmp_path / "m.h5") as m:
        assert m.parameters() == a.parameters() and m.parameters()["active"] < m.parameters()["total"]
        assert json.loads(m.attrs["router"]) == json.loads(a.attrs["router"])
