"""The shipped tiny-moe and tiny-dense: load offline with stock transformers, reproduce their recorded facts.

Everything here is recomputed independently of moeprof.embedded.train: a plain loop over the stock model forward on
the held-out corpus, a Counter-based unigram model, router hooks for the routing loads.
"""

import collections
import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

import moeprof
from moeprof import corpora

EMBEDDED = Path(moeprof.__file__).parent / "embedded"
NAMES = ("tiny-moe", "tiny-dense")
SEQ_LEN = 256

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _metrics(name):
    return json.loads((EMBEDDED / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    out = {}
    for name in NAMES:
        model = AutoModelForCausalLM.from_pretrained(EMBEDDED / name, local_files_only=True).eval()
        out[name] = (model, AutoTokenizer.from_pretrained(EMBEDDED / name, local_files_only=True))
    return out


@pytest.fixture(scope="module")
def heldout_windows(loaded):
    """The held-out texts, each + EOT, joined and cut into consecutive windows of SEQ_LEN tokens."""
    _, tok = loaded["tiny-moe"]
    stream = []
    for text in corpora.texts("mixed", "heldout", order="concatenated"):
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return [stream[i : i + SEQ_LEN] for i in range(0, len(stream), SEQ_LEN) if len(stream[i : i + SEQ_LEN]) >= 2]


def test_shipped_files_are_complete_small_and_share_one_tokenizer():
    total = 0
    for name in NAMES:
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md",
                  "metrics.json"]:
            assert (EMBEDDED / name / f).is_file(), f"{name}/{f}"
        total += sum(p.stat().st_size for p in (EMBEDDED / name).iterdir())
    assert total <= 30 * 2**20
    a, b = ((EMBEDDED / n / "tokenizer.json").read_bytes() for n in NAMES)
    assert a == b


def test_moe_routes_every_layer_and_dense_peer_has_about_its_active_params(loaded):
    moe, dense = loaded["tiny-moe"][0], loaded["tiny-dense"][0]
    cfg = moe.config
    assert type(moe).__name__ == "Qwen3MoeForCausalLM" and type(dense).__name__ == "Qwen3ForCausalLM"
    assert cfg.num_experts >= 8 and cfg.num_experts_per_tok >= 2 and cfg.norm_topk_prob
    assert cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1
    assert all(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in moe.model.layers)
    # active FFN width per token: top-k experts x moe_intermediate vs the dense intermediate
    assert cfg.num_experts_per_tok * cfg.moe_intermediate_size == dense.config.intermediate_size
    active = {n: _metrics(n)["params"]["active_per_token"] for n in NAMES}
    assert abs(active["tiny-moe"] / active["tiny-dense"] - 1) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_model_reproduces_recorded_heldout_perplexity_and_beats_unigram_3x(loaded, heldout_windows, name):
    model, tok = loaded[name]
    m = _metrics(name)
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in heldout_windows:
            ids = torch.tensor([window])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # [S-1, V]
            nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += len(window) - 1
    ppl = math.exp(nll / count)
    assert count == m["data"]["heldout_predicted_tokens"]
    assert ppl == pytest.approx(m["heldout_ppl"], rel=2e-3)
    assert 3 * ppl <= m["unigram_heldout_ppl"]


def test_recorded_unigram_perplexity_is_add_one_frequency_on_training_tokens(loaded, heldout_windows):
    _, tok = loaded["tiny-moe"]
    counts = collections.Counter()
    for text in corpora.texts("mixed", "train", order="concatenated"):
        counts.update(tok(text, add_special_tokens=False)["input_ids"])
        counts[tok.eos_token_id] += 1
    total = sum(counts.values()) + len(tok)
    targets = [t for w in heldout_windows for t in w[1:]]
    nll = -sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets)
    for name in NAMES:
        assert math.exp(nll) == pytest.approx(_metrics(name)["unigram_heldout_ppl"], rel=1e-4)


def test_moe_uses_its_experts_on_heldout_text(loaded, heldout_windows):
    model, _ = loaded["tiny-moe"]
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.long)
    handles = []
    for layer, block in enumerate(model.model.layers):
        def hook(module, args, output, layer=layer):
            _, _, top_k_index = output  # Qwen3MoeTopKRouter returns (logits, weights, indices [T, K])
            counts[layer] += torch.bincount(top_k_index.reshape(-1), minlength=cfg.num_experts)
        handles.append(block.mlp.gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for window in heldout_windows:
                model(input_ids=torch.tensor([window]))
    finally:
        for h in handles:
            h.remove()
    tokens = counts.sum(dim=1) / cfg.num_experts_per_tok  # [L]
    token_frac = counts / tokens[:, None]  # [L, E]
    assert (token_frac.max(dim=1).values <= 0.5).all(), token_frac
    dead = (token_frac < 0.01 * cfg.num_experts_per_tok / cfg.num_experts).sum(dim=1)
    assert (dead <= cfg.num_experts // 4).all(), dead
    recorded = torch.tensor(_metrics("tiny-moe")["routing"]["token_frac"])
    # same windows as the recorded facts; batching may flip a rare near-tie between experts
    assert torch.allclose(token_frac.double(), recorded.double(), atol=2e-3)
