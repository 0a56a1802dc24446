"""What an architecture adapter answers: where the GLU FFN sites are, where the router is, which activation.

Legend: L = decoder layers, E = experts per layer (1 for a dense FFN), H = hidden size, I = FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moeprof.arch.layout import DenseMLPLayout, GLUWeights, Layout
from moeprof.activation_functions import canonical_activation
from moeprof.errors import InvalidArgument

# What a site is. Routed experts keep the kind "moe", the value the store's /sites/kind has always held.
ROUTED, SHARED, DENSE = "moe", "shared", "dense"
SITE_KINDS = (ROUTED, SHARED, DENSE)


@dataclass(frozen=True)
class Site:
    """One GLU feed-forward site of a decoder layer: its kind, the module running it, and its Layout.

    kind: ROUTED (an MoE layer's fused experts, behind a router), SHARED (an expert every token goes through,
    beside the routed ones) or DENSE (a dense MLP, one "expert"). The layout owns the weights and the GLU.
    """

    layer: int
    kind: str  # one of SITE_KINDS
    module: nn.Module  # the FFN block (dense MLP, or the sparse MoE block holding router + experts)
    layout: Layout
    top_k: int = 1  # experts per token (1 for dense)
    experts: nn.Module | None = None  # the fused experts module (transformers 5 `use_experts_implementation`)
    router: nn.Module | None = None
    #: this site's row in the profile's [L, E] arrays (one per site: a layer may hold routed, shared and dense
    #: sites); None: the layer index (one site per layer)
    row: int | None = None
    #: the layer stack holding it ("" for a causal LM's one stack; "encoder" / "denoiser" in a block-diffusion
    #: model, `layer_stacks`)
    stack: str = ""

    def __post_init__(self):
        if self.kind not in SITE_KINDS:
            raise ValueError(f"site kind must be one of {SITE_KINDS}, got {self.kind!r}")
        if self.row is None:
            object.__setattr__(self, "row", self.layer)

    @property
    def is_routed(self) -> bool:
        """True for routed experts (tokens reach them through the router's top-k)."""
        return self.kind == ROUTED

    @property
    def mlp(self) -> nn.Module:
        """The FFN block (alias of `module`)."""
        return self.module

    @property
    def num_experts(self) -> int:
        """E (1 for dense)."""
        return self.layout.num_experts

    @property
    def hidden_size(self) -> int:
        """H."""
        return self.layout.hidden_size

    @property
    def intermediate_size(self) -> int:
        """I (per expert for MoE)."""
        return self.layout.intermediate_size

    @property
    def activation(self) -> str:
        """The canonical activation name (`moeprof.activation_functions.ACTIVATIONS`)."""
        return self.layout.activation

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds of one token through one expert's GLU (up, gate, down)."""
        return self.layout.flops_per_token


def expert_weights(site: Site, expert: int) -> GLUWeights:
    """Return the GLU matrices (gate [I, H], up [I, H], down [H, I]) of one expert of a site (dense: expert 0)."""
    return site.layout.weights(expert)


def activation_name(config, key: str) -> str:
    """Return moeprof's activation name for the config's `key` (e.g. hidden_act), or raise if not a GLU we know."""
    raw = getattr(config, key, None)
    try:
        return canonical_activation(raw)
    except ValueError as err:
        raise InvalidArgument(f"{err} (config field {key})") from None


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
    raise InvalidArgument(f"cannot find the decoder layers of {type(model).__name__}")


#: block-diffusion encoder–decoders (DiffusionGemma): the prompt encoder's layers, then the denoiser's
_BLOCK_DIFFUSION_STACKS = (("encoder", "model.encoder.language_model.layers"), ("denoiser", "model.decoder.layers"))


def _at(model: nn.Module, path: str):
    obj = model
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Return the model's decoder-layer stacks in order, each as (name, layers).

    A causal LM has one, named "". A block-diffusion encoder–decoder (DiffusionGemma) has two that share their
    weights: "encoder" (causal; encodes the prompt and each finished block into the KV cache) and "denoiser"
    (bidirectional over the canvas; runs once per denoising step). Both run the experts, so both are profiled.
    """
    stacks = [(name, _at(model, path)) for name, path in _BLOCK_DIFFUSION_STACKS]
    if all(isinstance(layers, nn.ModuleList) for _, layers in stacks):
        return stacks
    return [("", decoder_layers(model))]


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
        return [self.layer_site(idx, layer.mlp, config, act) for idx, layer in enumerate(decoder_layers(model))]

    def layer_site(self, idx: int, mlp: nn.Module, config, act: str) -> Site:
        """Return the Site of one decoder layer's FFN block: fused experts (`moe_site`) or a dense MLP."""
        experts = getattr(mlp, "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj"):
            return self.moe_site(idx, mlp, config, act)
        return Site(idx, DENSE, mlp, DenseMLPLayout(mlp, act))

    def moe_site(self, idx: int, mlp: nn.Module, config, act: str) -> Site:
        raise InvalidArgument(f"{self.family} has no MoE layers")
