"""What an architecture adapter answers: where the GLU FFN sites are, where the router is, which activation.

Legend: L = decoder layers, E = experts per layer (1 for a dense FFN), H = hidden size, I = FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Site:
    """One GLU feed-forward site: a dense MLP (one expert) or an MoE layer's fused experts."""

    layer: int
    kind: str  # "moe" | "dense"
    mlp: nn.Module  # the FFN block (dense MLP, or the sparse MoE block holding router + experts)
    num_experts: int  # E (1 for dense)
    top_k: int  # experts per token (1 for dense)
    hidden_size: int  # H
    intermediate_size: int  # I (per expert for MoE)
    activation: str  # "silu" | "gelu_tanh"
    experts: nn.Module | None = None  # the fused experts module (transformers 5 `use_experts_implementation`)
    router: nn.Module | None = None

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds of one token through one expert's GLU (up, gate, down)."""
        return 3 * self.hidden_size * self.intermediate_size


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def activation_name(config, key: str) -> str:
    """Return moeprof's activation name for the config's `key` (e.g. hidden_act), or raise if not a GLU we know."""
    raw = getattr(config, key, None)
    try:
        return _ACTIVATIONS[raw]
    except KeyError:
        raise ValueError(f"activation {raw!r} ({key}) is not supported; moeprof knows {sorted(_ACTIVATIONS)}") from None


def text_config(config):
    """Return the text sub-config of a multimodal config (Gemma3), else the config itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the decoder layer list of a causal LM (text stack of a multimodal model included)."""
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


@dataclass(frozen=True)
class Adapter:
    """An architecture family: its model types, activation config key and how to read its FFN sites."""

    family: str
    model_types: tuple[str, ...]
    activation_key: str = "hidden_act"

    def sites(self, model: nn.Module) -> list[Site]:
        """Return one Site per decoder layer, in layer order."""
        config = text_config(model.config)
        act = activation_name(config, self.activation_key)
        out = []
        for idx, layer in enumerate(decoder_layers(model)):
            mlp = layer.mlp
            experts = getattr(mlp, "experts", None)
            if experts is not None and hasattr(experts, "gate_up_proj"):
                out.append(self.moe_site(idx, mlp, config, act))
            else:
                out.append(Site(idx, "dense", mlp, 1, 1, config.hidden_size, mlp.up_proj.out_features, act))
        return out

    def moe_site(self, idx: int, mlp: nn.Module, config, act: str) -> Site:
        raise ValueError(f"{self.family} has no MoE layers")
