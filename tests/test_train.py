"""The training recipe machinery on tiny dims: it runs, the loss goes down, the output loads offline."""

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moeprof.embedded import train as tr

TINY_RECIPE = """
name = "tiny-test-{kind}"
seed = 3

[data]
corpus = "wikipedia"
seq_len = 64

[tokenizer]
vocab_size = 512
min_frequency = 2

[model]
{model}
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 16
tie_word_embeddings = true
max_position_embeddings = 128

[train]
steps = {steps}
batch_size = 4
lr = 1e-2
warmup_steps = 3
weight_decay = 0.0
eval_every = 0
log_every = 100
threads = 1
{train_extra}
"""
MOE = """architecture = "Qwen3MoeForCausalLM"
num_experts = 4
num_experts_per_tok = 2
moe_intermediate_size = 16
norm_topk_prob = true
router_aux_loss_coef = 0.01"""
DENSE = """architecture = "Qwen3ForCausalLM"
intermediate_size = 32"""


def _recipe(tmp_path, kind, steps):
    model, extra = (MOE, 'experts_implementation = "eager"') if kind == "moe" else (DENSE, "")
    text = TINY_RECIPE.format(kind=kind, model=model, steps=steps, train_extra=extra)
    path = tmp_path / f"{kind}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private moeprof cache (one tokenizer trained for the module) reusing the real evals wheel."""
    from moeprof import corpora

    wheels = {name: corpora.fetch_wheel(name, version)  # downloaded once, then cached
              for name, version in (("evals", corpora.EVALS_VERSION), ("networkx", corpora.NETWORKX_VERSION))}
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEPROF_CACHE", str(root))
        mp.setattr(corpora, "fetch_wheel", lambda name, version: wheels[name])
        yield root


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_recipe_runs_and_training_loss_goes_down(tmp_path, cache, kind):
    out = tmp_path / "out"
    metrics = tr.train(_recipe(tmp_path, kind, steps=40), out)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["lm_loss"] for r in rows[:5]) / 5
    last = sum(r["lm_loss"] for r in rows[-5:]) / 5
    assert first > math.log(512) - 0.5  # starts near uniform over the vocabulary
    assert last < first - 0.4
    assert metrics["heldout_ppl"] < math.exp(first)
    assert metrics["tokens_seen"] == 40 * 4 * 64
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json",
                 "MODEL_CARD.md", "recipe.toml"]:
        assert (out / name).is_file(), name
    if kind == "moe":
        routing = metrics["routing"]
        assert len(routing["token_frac"]) == 2 and len(routing["token_frac"][0]) == 4
        assert all(abs(sum(row) - 2) < 1e-3 for row in routing["token_frac"])  # each token picks 2 experts
    else:
        assert "routing" not in metrics


def test_trained_folder_loads_offline_with_stock_auto_classes(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    metrics = tr.train(_recipe(tmp_path, "moe", steps=20), out, max_steps=3)
    assert metrics["steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert tok.decode(tok("The river flows.")["input_ids"]) == "The river flows."
    assert model.config.num_experts == 4 and model.config.norm_topk_prob


def test_training_is_reproducible_from_the_seed(tmp_path, cache):
    losses = []
    for run in ("a", "b"):
        out = tmp_path / run
        tr.train(_recipe(tmp_path, "moe", steps=4), out)
        losses.append([json.loads(line)["lm_loss"] for line in (out / "train_log.jsonl").read_text().splitlines()])
    assert losses[0] == losses[1]


def test_recipes_with_equal_tokenizer_settings_share_one_tokenizer(cache):
    a = tr.cached_tokenizer("wikipedia", 512, 2)
    b = tr.cached_tokenizer("wikipedia", 512, 2)
    assert a == b and (a / "tokenizer.json").is_file()


def test_unigram_nll_is_add_one_smoothed_frequency():
    train_ids = torch.tensor([0, 0, 1, 2])  # counts + 1 over V=4: [3, 2, 2, 1] / 8
    windows = [torch.tensor([3, 0, 3])]  # targets 0 and 3
    expected = -(math.log(3 / 8) + math.log(1 / 8)) / 2
    assert tr.unigram_nll(train_ids, windows, vocab_size=4) == pytest.approx(expected)


def test_routing_facts_flag_a_dominant_expert_and_dead_ones():
    counts = torch.tensor([[10, 10, 10, 10], [20, 10, 10, 0]])  # 20 tokens per layer, top-2
    facts = tr.routing_facts(counts, top_k=2)
    assert facts["tokens_per_layer"] == 20
    assert facts["max_token_frac_per_layer"] == [0.5, 1.0]
    assert facts["dead_experts_per_layer"] == [0, 1]


def test_unknown_architecture_is_rejected_with_the_choices(tmp_path):
    path = _recipe(tmp_path, "dense", steps=2)
    path.write_text(path.read_text().replace("Qwen3ForCausalLM", "GPT2LMHeadModel"))
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM"):
        tr.Recipe.load(path)


def test_per_layer_balance_loss_sees_imbalance_that_pooling_over_layers_hides():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    tokens = 10
    layer_a = torch.tensor([[10.0, 10.0, 0.0, 0.0]]).repeat(tokens, 1)  # [T, E]: every token to experts 0, 1
    layer_b = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(tokens, 1)  # every token to experts 2, 3
    uniform = torch.zeros(tokens, 4)  # uniform router probabilities
    pooled = load_balancing_loss_func((layer_a, layer_b), 4, 2)
    assert float(pooled) == pytest.approx(2.0, abs=1e-3)  # looks perfectly balanced when pooled
    assert float(tr.per_layer_balance_loss((layer_a, layer_b), 4, 2)) == pytest.approx(4.0, abs=1e-3)
    assert float(tr.per_layer_balance_loss((uniform,), 4, 2)) == pytest.approx(2.0, abs=1e-3)


def test_dead_means_no_token_and_starved_means_under_one_percent_of_uniform():
    counts = torch.tensor([[2000, 1999, 1, 0]])  # top-1 over 4 experts: uniform share 0.25, 1% of it 0.0025
    facts = tr.routing_facts(counts, top_k=1)
    assert facts["dead_experts_per_layer"] == [1]  # expert 3 only, as moeprof.outliers counts dead
    assert facts["starved_experts_per_layer"] == [2]  # experts 2 (0.00025 of tokens) and 3
    assert facts["starved_threshold_token_frac"] == pytest.approx(0.0025)


def test_training_restores_the_thread_count_and_the_global_rng(tmp_path, cache):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the recipe says 1: a difference the run must undo
    before = torch.get_num_threads()
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    try:
        tr.train(_recipe(tmp_path, "dense", steps=2), tmp_path / "out", max_steps=1)
        assert torch.get_num_threads() == before
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.set_num_threads(threads)


def test_multi_domain_recipe_measures_each_domain_and_remeasure_gives_the_same_numbers(tmp_path, cache):
    from moeprof import corpora
    from moeprof.outliers import routing_mutual_information

    path = _recipe(tmp_path, "moe", steps=3)
    path.write_text(path.read_text().replace('corpus = "wikipedia"', 'corpus = "domains"\norder = "interleaved"'))
    out = tmp_path / "out"
    metrics = tr.train(path, out)
    assert list(metrics["per_domain"]) == ["wikipedia", "owt", "code"]
    assert metrics["data"]["domains"] == ["wikipedia", "owt", "code"] and "networkx" in metrics["data"]["source"]
    for name, d in metrics["per_domain"].items():
        assert d["texts"] == len(corpora.texts(name, "heldout"))
        assert d["ratio_unigram_own_over_model"] == pytest.approx(d["unigram_own_ppl"] / d["ppl"], rel=1e-2)
    counts = np.stack([np.array(d["routing"]["token_frac"]) * d["routing"]["tokens_per_layer"]
                       for d in metrics["per_domain"].values()])  # [D, L, E]
    mi = routing_mutual_information(counts)["mi_bits"]
    assert metrics["routing_mi"]["mi_bits"] == pytest.approx(mi, abs=2e-3)
    assert metrics["first_losses"] == [json.loads(line)["lm_loss"]
                                       for line in (out / "train_log.jsonl").read_text().splitlines()]
    card = (out / "MODEL_CARD.md").read_text()
    for section in ("## Per domain", "## Routing specialization", "## How much experts differ", "sha256"):
        assert section in card
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the recipe says 1: remeasure must put this back
    before = torch.get_num_threads()
    try:
        again = tr.remeasure(out)
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(threads)
    for key in ("heldout_ppl", "per_domain", "routing_mi", "expert_spread", "sha256_model_safetensors"):
        assert again[key] == metrics[key], key


def test_unknown_data_order_is_rejected(tmp_path):
    path = _recipe(tmp_path, "dense", steps=2)
    path.write_text(path.read_text().replace('corpus = "wikipedia"', 'corpus = "wikipedia"\norder = "shuffled"'))
    with pytest.raises(ValueError, match="interleaved"):
        tr.Recipe.load(path)


def test_train_cli_refuses_bad_input_with_one_line_and_exit_2(tmp_path, capsys):
    recipe = _recipe(tmp_path, "dense", steps=2)
    assert tr.main([str(recipe), "--out", str(tmp_path / "empty"), "--measure-only"]) == 2
    assert tr.main([str(recipe), "--out", str(tmp_path / "empty"), "--measure-only", "--max-steps", "3"]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text(recipe.read_text().replace('corpus = "wikipedia"', 'corpus = "wikipedia"\norder = "shuffled"'))
    assert tr.main([str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "holds no trained model" in err[0] and "--measure-only" in err[1] and "interleaved" in err[2]
