"""Real MoE checkpoints' recipes: each builds on the meta device with the published sites, experts and size."""

from pathlib import Path

import pytest

from moeprof.arch import adapter_for
from moeprof.cli.profiling import load_recipe
from moeprof.models import build_on_meta, config_from_recipe

RECIPES = Path(__file__).parents[1] / "recipes"

# recipe → (routed sites, experts per site, top-k, shared sites, dense sites, published total parameters)
PUBLISHED = {
    "olmoe-1b-7b": (16, 64, 8, 0, 0, 6.92e9),  # "1B active / 7B total" (6.92 B)
    "mixtral-8x7b": (32, 8, 2, 0, 0, 46.7e9),
    "qwen1.5-moe-a2.7b": (24, 60, 4, 24, 0, 14.3e9),
    "deepseek-v3": (58, 256, 8, 58, 3, 671e9),  # without the multi-token-prediction module
    "gpt-oss-20b": (24, 32, 4, 0, 0, 20.9e9),
    "gpt-oss-120b": (36, 128, 4, 0, 0, 116.8e9),
    "qwen3-next-80b-a3b": (48, 512, 10, 48, 0, 80e9),
    "qwen3-235b-a22b": (94, 128, 8, 0, 0, 235e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_builds_on_meta_with_published_sites_and_size(name):
    routed_n, experts, top_k, shared_n, dense_n, total = PUBLISHED[name]
    model = build_on_meta(config_from_recipe(load_recipe(RECIPES / f"{name}.toml")))
    sites = adapter_for(model).sites(model)
    routed = [s for s in sites if s.is_routed]
    assert len(routed) == routed_n and {(s.num_experts, s.top_k) for s in routed} == {(experts, top_k)}
    assert sum(s.kind == "shared" for s in sites) == shared_n
    assert sum(s.kind == "dense" for s in sites) == dense_n
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - total) / total < 0.015, f"{params / 1e9:.2f} B"
