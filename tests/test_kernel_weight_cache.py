"""Transposed expert-weight copies are owned per weight: kept across sparsify contexts, freed with the model."""

import gc

import torch
from families import tiny

from moeprof.arch import adapter_for
from moeprof.capture import sparsify
from moeprof.kernels import (
    clear_transposed_cache,
    release_kernel_copies,
    transposed_cache_bytes,
    transposed_expert_weight,
)


def _routed_batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 48, generator=g)  # [T, H]
    idx = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(5)])  # [T, K]: ~2 pairs per expert
    w = torch.softmax(torch.randn(5, 3, generator=g), -1)  # [T, K]
    return x, idx, w


def test_two_sparsify_contexts_in_a_row_reuse_the_transposed_copy_and_model_deletion_frees_it():
    clear_transposed_cache()
    model = tiny("qwen3_moe")
    experts = adapter_for(model).sites(model)[0].experts
    x, idx, w = _routed_batch()
    with torch.no_grad(), sparsify(model, type="i", p=0.5):
        experts(x, idx, w)  # decode-like routing: the gather path builds down_projᵀ
    copy = transposed_expert_weight(experts.down_proj)  # a hit returns the copy the context built
    held = transposed_cache_bytes()
    assert held == experts.down_proj.numel() * experts.down_proj.element_size()
    with torch.no_grad(), sparsify(model, type="i", p=0.5):
        experts(x, idx, w)
    assert transposed_expert_weight(experts.down_proj) is copy  # not rebuilt by the second context
    assert transposed_cache_bytes() == held
    del model, experts, copy
    gc.collect()
    assert transposed_cache_bytes() == 0


def test_inplace_weight_update_between_contexts_rebuilds_the_copy_and_changes_the_output():
    clear_transposed_cache()
    model = tiny("qwen3_moe")
    experts = adapter_for(model).sites(model)[0].experts
    x, idx, w = _routed_batch()
    with torch.no_grad(), sparsify(model, type="i", p=0.5):
        before = experts(x, idx, w)
    copy = transposed_expert_weight(experts.down_proj)
    with torch.no_grad():
        experts.down_proj.mul_(2)  # bumps the parameter's version counter
    with torch.no_grad(), sparsify(model, type="i", p=0.5):
        after = experts(x, idx, w)
    rebuilt = transposed_expert_weight(experts.down_proj)
    assert rebuilt is not copy and torch.equal(rebuilt, experts.down_proj.detach().transpose(1, 2))
    assert torch.allclose(after, 2 * before, atol=1e-5)  # down_proj is linear in the output


def _sparsified_once(model):
    experts = adapter_for(model).sites(model)[0].experts
    x, idx, w = _routed_batch()
    with torch.no_grad(), sparsify(model, type="i", p=0.5):
        experts(x, idx, w)  # the gather path builds down_projᵀ
    return experts.down_proj.numel() * experts.down_proj.element_size()


def test_release_kernel_copies_frees_one_models_copies_and_keeps_another_models():
    clear_transposed_cache()
    a, b = tiny("qwen3_moe"), tiny("qwen3_moe")
    size = _sparsified_once(a)
    assert _sparsified_once(b) == size
    assert transposed_cache_bytes(a) == transposed_cache_bytes(b) == size
    assert release_kernel_copies(a) == size
    assert transposed_cache_bytes(a) == 0
    assert transposed_cache_bytes(b) == size == transposed_cache_bytes()
    assert release_kernel_copies(a) == 0  # nothing left to free


def test_moeprof_lm_releases_its_copies_when_it_turns_dense_or_changes_type():
    from conftest import tiny_tokenizer

    from moeprof.evaluate.lm_eval_model import MoeprofLM

    clear_transposed_cache()
    tok = tiny_tokenizer()
    model = tiny("qwen3_moe", vocab_size=len(tok))
    lm = MoeprofLM(pretrained=model, tokenizer=tok, type="i", p=0.5, batch_size=1)
    ids = torch.tensor([[5, 9]])  # 2 tokens · 3 slots over 7 experts: the gather path, which builds copies
    lm._model_call(ids)
    assert transposed_cache_bytes(model) > 0
    lm.set_sparsity("i", 0.8)
    assert transposed_cache_bytes(model) > 0  # the same type reuses its copies
    lm.set_sparsity("x", 0.5)
    assert transposed_cache_bytes(model) == 0
    lm._model_call(ids)
    assert transposed_cache_bytes(model) > 0
    lm.set_sparsity(None, None)
    assert transposed_cache_bytes(model) == 0
