"""The generic MoE adapter: every decoder layer's experts found from the model, by the experts interface.

Any module whose class was decorated by transformers' `use_experts_implementation` is a routed site, wherever
it sits (`layer.mlp.experts`, Granite's `block_sparse_moe`, Jamba's `feed_forward`, Nemotron-H's `mixer`,
Gemma-4's `layer.experts`). Its block (the module holding it) holds the router (`gate` or `router`) and, where
the family has one, a shared expert (`shared_expert`, `shared_experts`): a SHARED site of its own. A layer's
dense GLU MLP (`mlp_only_layers`, DeepSeek's first `first_k_dense_replace` layers, Gemma-4's `mlp` beside its
experts) is a DENSE site. The layout of each experts class is `moeprof.arch.layout.experts_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moeprof.arch.base import DENSE, ROUTED, SHARED, Adapter, Site, layer_stacks, text_config
from moeprof.arch.layout import DenseMLPLayout, experts_layout, own_activation
from moeprof.errors import InvalidArgument

ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
FFN_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "mixer", "moe")


def is_experts(module: nn.Module) -> bool:
    """True for a module whose class was decorated by `use_experts_implementation` (the flags it sets)."""
    return hasattr(module, "is_concatenated") and hasattr(module, "_is_expert_parallel")


def has_experts(model: nn.Module) -> bool:
    """True when any module of `model` goes through transformers' experts interface."""
    return any(is_experts(m) for m in model.modules())


def is_dense_glu(module: nn.Module) -> bool:
    """True for a Llama-style GLU MLP: `gate_proj`, `up_proj`, `down_proj` linears and an `act_fn` module."""
    return (all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(getattr(module, "act_fn", None), nn.Module))


def _dense_layout(mlp: nn.Module) -> DenseMLPLayout:
    return DenseMLPLayout(mlp, own_activation(mlp.act_fn), act_fn=mlp.act_fn)


TOP_K_NAMES = ("top_k", "num_experts_per_tok", "top_k_experts", "moe_k", "moe_topk", "k")


def _top_k(block: nn.Module, router: nn.Module | None, config) -> int:
    """Return K, the experts per token, from the router, its block or the config (the first that names it)."""
    for obj in (router, block, config):
        for name in TOP_K_NAMES:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    raise InvalidArgument(f"cannot find how many experts {type(block).__name__} routes each token to")


@dataclass(frozen=True)
class ExpertsAdapter(Adapter):
    """Any transformers 5 family whose experts go through the experts interface."""

    def sites(self, model: nn.Module) -> list[Site]:
        """Return the sites in layer order; in a layer: routed experts, then its shared expert, then a dense MLP.

        Layers count on through a model's stacks (`layer_stacks`): in a block-diffusion model of L layers, layer l
        of the encoder is layer l and layer l of the denoiser is layer L + l.
        """
        config = text_config(model.config)
        sites: list[Site] = []
        idx = 0
        for stack, layers in layer_stacks(model):
            for layer in layers:
                for site in self.layer_sites(idx, layer, config):
                    sites.append(Site(site.layer, site.kind, site.module, site.layout, site.top_k, site.experts,
                                      site.router, row=len(sites), stack=stack))
                idx += 1
        return sites

    def layer_sites(self, idx: int, layer: nn.Module, config) -> list[Site]:
        found: list[Site] = []
        blocks = set()
        for name, module in layer.named_modules():
            if not is_experts(module):
                continue
            parent_name = name.rpartition(".")[0]
            block = layer.get_submodule(parent_name) if parent_name else layer
            blocks.add(id(block))
            router = next((getattr(block, n) for n in ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)),
                          None)
            found.append(Site(idx, ROUTED, block, experts_layout(module), top_k=_top_k(block, router, config),
                              experts=module, router=router))
            for n in SHARED_NAMES:
                shared = getattr(block, n, None)
                if isinstance(shared, nn.Module) and is_dense_glu(shared):
                    found.append(Site(idx, SHARED, shared, _dense_layout(shared)))
        for n in FFN_NAMES:
            mlp = getattr(layer, n, None)
            if isinstance(mlp, nn.Module) and id(mlp) not in blocks and is_dense_glu(mlp):
                found.append(Site(idx, DENSE, mlp, _dense_layout(mlp)))
        return found


ADAPTER = ExpertsAdapter(family="experts", model_types=())


def router_facts(model: nn.Module, sites: list[Site]) -> dict:
    """Return what the model states about its routers (the store's `router` attr).

    scoring: the config's `scoring_func`, else "sigmoid" where the router carries DeepSeek-V3's
    `e_score_correction_bias`, else "unstated"; group_limited: top-k within the best `topk_group` of `n_group`
    expert groups; renormalized: the config's `norm_topk_prob`, else measured on the router's own code path
    (`probe_renormalized`: Mixtral, for one, renormalizes in its router and has no such config field; None where
    neither tells), and `renormalized_from` says which; routed_scaling_factor: the factor on routed outputs (1.0
    where the config has none).
    """
    config = text_config(model.config)
    routers = [s.router for s in sites if s.is_routed and s.router is not None]
    scoring = getattr(config, "scoring_func", None)
    if not isinstance(scoring, str):
        scoring = "sigmoid" if any(hasattr(r, "e_score_correction_bias") for r in routers) else "unstated"
    n_group = getattr(config, "n_group", None)
    norm = getattr(config, "norm_topk_prob", None)
    source = "config"
    if norm is None:
        norm = probe_renormalized(next((s for s in sites if s.is_routed), None))
        source = "probe" if norm is not None else None
    return {
        "scoring": scoring,
        "group_limited": bool(isinstance(n_group, int) and n_group > 1),
        "n_group": n_group, "topk_group": getattr(config, "topk_group", None),
        "renormalized": None if norm is None else bool(norm), "renormalized_from": source,
        "routed_scaling_factor": float(getattr(config, "routed_scaling_factor", None) or 1.0),
        "top_k": max((s.top_k for s in sites if s.is_routed), default=1),
    }


def probe_renormalized(site: Site | None, tokens: int = 16) -> bool | None:
    """Return whether every token's top-k weights, as the site's block hands them to its experts, sum to one
    constant (renormalized after top-k, times any fixed scaling), measured on random hidden states [1, tokens, H]
    through the block's own forward; None where the block cannot run alone (it needs the decoder layer's other
    inputs) or its weights are not materialized (meta device)."""
    import torch

    if site is None or site.experts is None:
        return None
    param = next(site.experts.parameters(), None)
    if param is None or param.device.type == "meta" or getattr(site.experts, "_moeprof_engine", None) is not None:
        return None  # no weights, or inside a capture (the probe's tokens would be counted)
    seen: list = []

    def grab(module, args, kwargs):
        seen.append((list(args) + list(kwargs.values()))[2].detach())

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, site.hidden_size, generator=generator).to(param.device, param.dtype)
    handle = site.experts.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            site.module(x)
    except Exception:  # a block that needs more than hidden states (a whole decoder layer): its router alone
        seen = _router_topk_weights(site, x.reshape(-1, site.hidden_size))
    finally:
        handle.remove()
    if not seen:
        return None
    sums = seen[0].float().reshape(-1, seen[0].shape[-1]).sum(-1)  # [T]
    if not bool(torch.isfinite(sums).all()):
        return None
    return bool(torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-4, atol=1e-5))


def _router_topk_weights(site: Site, x) -> list:
    """Return [the top-k weights [T, K]] the site's router computes for x [T, H] (the one floating-point output of
    that shape), or [] when the router cannot run alone or returns no such tensor."""
    import torch

    if site.router is None:
        return []
    try:
        with torch.no_grad():
            out = site.router(x)
    except Exception:
        return []
    outs = out if isinstance(out, (tuple, list)) else (out,)
    found = [t for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point()
             and tuple(t.shape) == (x.shape[0], site.top_k)]
    return found[:1] if len(found) == 1 else []
