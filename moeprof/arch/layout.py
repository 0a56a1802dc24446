"""How one FFN site stores its weights and what its GLU computes: x, u, g, i, and the output y.

Every step computes in the dtype of its input (an expert's weights are cast when they differ).

Legend: N = rows (tokens) of one expert, S = rows of all experts grouped by expert (counts[e] rows each, in
expert order), E = experts, H = hidden size, I = FFN width per expert.

A Layout is the only code that reads a site's weights. Capture (grouped, one GEMM per expert), per-expert
tolerance (one expert at a time) and the kernel dispatch (`kernel_ok`) all go through it, so a family whose
storage or GLU differs is a new Layout subclass (registered in `LAYOUTS` by its experts class name), never a
branch in those callers. The GLU is split in steps so that each of u, g and i can be observed and sparsified
between them:

    gate_pre, up_pre = project(x)       the input projections (biases included)
    u = up(up_pre)                      today's families: u = W_u x (+ b_u)
    g = gate(gate_pre)                  today's families: g = σ(W_g x (+ b_g))
    i = combine(u, g)                   today's families: i = u ⊙ g, what enters down_proj
    y = down(i)                         W_d i (+ b_d)
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moeprof.activation_functions import ACTIVATIONS, canonical_activation
from moeprof.errors import MoeprofError


class UnsupportedArchitecture(MoeprofError, ValueError):
    """The model's architecture has no moeprof adapter, or a GLU moeprof cannot define exactly (a user error)."""


class GLUWeights(NamedTuple):
    """One expert's GLU matrices as views of the module's parameters (no copies)."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]


class GLUBiases(NamedTuple):
    """One expert's GLU bias vectors as views of the module's parameters."""

    gate: torch.Tensor  # [I]
    up: torch.Tensor  # [I]
    down: torch.Tensor  # [H]


def grouped_linear(x_g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: Sequence[int],
                   transposed: bool = False) -> torch.Tensor:
    """Return x_g [S, in] → [S, out] by expert group (counts[e] rows each); weight [E, out, in] ([E, in, out] if
    transposed).

    One `F.grouped_mm` call where torch has one for these operands: the kernel the stock transformers experts
    (`grouped_mm`, their default) run, so a captured forward does the same GEMM work as the stock one; else one
    F.linear per expert.
    """
    if _grouped_mm_applies(x_g, weight, counts):
        offs = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x_g.device)  # [E] ends
        out = F.grouped_mm(x_g, weight if transposed else weight.transpose(-2, -1), offs=offs)  # [S, out]
        if bias is not None:
            out += bias.repeat_interleave(torch.as_tensor(counts, device=bias.device), dim=0).to(out.dtype)
        return out
    out_dim = weight.shape[-1] if transposed else weight.shape[-2]
    out = x_g.new_empty(x_g.shape[0], out_dim)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        w = weight[e].t() if transposed else weight[e]
        out[start:start + n] = _linear(x_g[start:start + n], w, None if bias is None else bias[e])
        start += n
    return out


def _grouped_mm_applies(x_g: torch.Tensor, weight: torch.Tensor, counts: Sequence[int]) -> bool:
    """True when `F.grouped_mm` computes this grouped product: same dtype, one group per expert row of the weight,
    and a kernel for the device (the CPU; on CUDA bf16 on compute capability 8.0 or newer)."""
    if not hasattr(F, "grouped_mm") or x_g.dim() != 2 or weight.dim() != 3 or len(counts) != weight.shape[0]:
        return False
    if x_g.dtype != weight.dtype or x_g.device != weight.device or x_g.shape[0] == 0:
        return False
    if x_g.device.type == "cpu":
        return x_g.dtype in (torch.float32, torch.bfloat16)
    return (x_g.device.type == "cuda" and x_g.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x_g.device) >= (8, 0))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return F.linear in x's dtype: a weight of another dtype (fp32 tolerance on a bf16 model) is cast first."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class Layout:
    """The weights and the GLU of one FFN site (E experts, or one for a dense MLP); subclasses say how they are stored.

    A subclass implements `weights`, `biases`, `project_grouped` and `down_grouped`; the nonlinearity
    (`up`, `gate`, `combine`) is today's σ-GLU; a family whose GLU differs overrides them and sets
    `plain_glu = False`, which keeps it off the grouped kernel (`kernel_ok`).
    """

    #: the GLU is exactly i = (W_u x) ⊙ σ(W_g x) with no bias (what the grouped top-p kernel computes)
    plain_glu = True
    #: the activation types this site has (a non-gated expert has no g)
    types: tuple[str, ...] = ("x", "u", "g", "i")
    #: the activation's name where the module has no `act_fn` of its own (the layout's GLU says it all)
    glu_name = "glu"

    def __init__(self, module: nn.Module, activation: str | None, num_experts: int, hidden_size: int,
                 intermediate_size: int, act_fn=None):
        """`activation`: a canonical name (or spelling) of `moeprof.activation_functions.ACTIVATIONS`; None with `act_fn`: the
        module's own activation, named after its class, which the grouped kernel does not take."""
        self.module = module  # the module holding the weights (fused experts, or the dense MLP)
        self.num_experts = num_experts  # E
        self.hidden_size = hidden_size  # H
        self.intermediate_size = intermediate_size  # I
        if activation is None:  # the module's own σ, or none where the layout's GLU names its own (GPT-OSS)
            self.activation = type(act_fn).__name__ if act_fn is not None else self.glu_name
            self.act_fn = act_fn
        else:
            self.activation = canonical_activation(activation)
            self.act_fn = ACTIVATIONS[self.activation]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.module).__name__}, {self.activation}, E={self.num_experts}, "
                f"H={self.hidden_size}, I={self.intermediate_size})")

    @property
    def device(self) -> torch.device:
        """The device of the site's weights (where `glu` and `down` run)."""
        return next(self.module.parameters()).device

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds of one token through one expert (up, gate, down projections)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def kernel_ok(self) -> bool:
        """True when `moeprof.kernels.grouped_topp_glu` computes this site exactly (see `kernel_weights`)."""
        return False

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (gate_up [E, 2I, H] gate rows first, down [E, H, I]) for the grouped kernel (only if kernel_ok)."""
        raise ValueError(f"{self!r} is not in the grouped kernel's layout; check `kernel_ok` first")

    def taps(self) -> dict[str, tuple[nn.Module, str]]:
        """Return, per activation type, the submodule whose forward carries it and where: "input" or "output".

        Only sites captured by hooks (not routed through the experts interface) have taps.
        """
        raise NotImplementedError(f"{type(self).__name__} is captured through the experts interface, not by hooks")

    # -- storage (subclasses) ------------------------------------------------------------------------------

    def weights(self, expert: int) -> GLUWeights:
        """Return the GLU matrices of one expert (dense MLP: expert 0)."""
        raise NotImplementedError

    def biases(self, expert: int) -> GLUBiases | None:
        """Return the GLU bias vectors of one expert, or None when the site has no biases."""
        raise NotImplementedError

    def project_grouped(self, x_g: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (gate_pre [S, I], up_pre [S, I]) of rows x_g [S, H] grouped by expert (counts [E])."""
        raise NotImplementedError

    def down_grouped(self, i_g: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Return y [S, H] = the down projection of rows i_g [S, I] grouped by expert (counts [E])."""
        raise NotImplementedError

    # -- the GLU (the family's definition of u, g, i) -------------------------------------------------------

    def up(self, up_pre: torch.Tensor) -> torch.Tensor:
        """Return u from the up projection."""
        return up_pre

    def gate(self, gate_pre: torch.Tensor) -> torch.Tensor:
        """Return g = σ(gate projection)."""
        return self.act_fn(gate_pre)

    def combine(self, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Return i, the vector that enters the down projection."""
        return g * u

    # -- one expert ---------------------------------------------------------------------------------------

    def _check(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} does not exist; this site has experts 0..{self.num_experts - 1}")

    def _one(self, expert: int, n: int) -> list[int]:
        """Return counts [E] that put n grouped rows on `expert`."""
        self._check(expert)
        counts = [0] * self.num_experts
        counts[expert] = n
        return counts

    def project(self, x: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (gate_pre [N, I], up_pre [N, I]) of rows x [N, H] through one expert."""
        return self.project_grouped(x, self._one(expert, x.shape[0]))

    def glu(self, x: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (u, g, i), each [N, I], of rows x [N, H] through one expert."""
        gate_pre, up_pre = self.project(x, expert)
        u, g = self.up(up_pre), self.gate(gate_pre)
        return u, g, self.combine(u, g)

    def down(self, i: torch.Tensor, expert: int) -> torch.Tensor:
        """Return y [N, H], the expert's output for i [N, I] (before any router weight)."""
        return self.down_grouped(i, self._one(expert, i.shape[0]))

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Return y [N, H] of rows x [N, H] through one expert (before any router weight)."""
        return self.down(self.glu(x, expert)[2], expert)


def own_activation(act_fn) -> str | None:
    """Return the canonical name of `moeprof.activation_functions.ACTIVATIONS` that computes exactly what `act_fn` does, else None."""
    probe = torch.linspace(-12.0, 12.0, 97)
    with torch.no_grad():
        try:
            want = act_fn(probe)
        except TypeError:  # an activation of two arguments (gate, up): not a σ
            return None
        for name, fn in ACTIVATIONS.items():
            if torch.equal(fn(probe), want):
                return name
    return None


class FusedExpertsLayout(Layout):
    """transformers 5 fused experts (`@use_experts_implementation`): `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I].

    The storage flags are read from the module, where the decorator sets them: `is_concatenated` (gate rows
    then up rows; else interleaved gate0, up0, gate1, …), `is_transposed` ([E, H, 2I] and [E, I, H]),
    `has_bias` (`gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, H]), `has_post_expert_norm` (the module's
    `post_expert_norm` on each expert's output, before the router weight). σ is the module's own `act_fn`.

    The GLU (`up`, `gate`, `combine`) must compute exactly what the class's own `_apply_gate` computes: the
    constructor checks it on a probe wide enough to reach every clamp and refuses the class otherwise.
    """

    def __init__(self, experts: nn.Module, activation: str | None = None):
        self._check_storage(experts)
        self.concatenated = bool(getattr(experts, "is_concatenated", True))
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.has_bias = bool(getattr(experts, "has_bias", False))
        self.post_norm = experts.post_expert_norm if getattr(experts, "has_post_expert_norm", False) else None
        E, H, I = self._sizes(experts)
        own = getattr(experts, "act_fn", None)
        if own is not None:
            name = own_activation(own)
        else:
            name = None if activation is None else canonical_activation(activation)
        super().__init__(experts, name, E, H, I, act_fn=own)
        self._check_gate()

    def _check_storage(self, experts: nn.Module) -> None:
        if not getattr(experts, "has_gate", True) or not hasattr(experts, "gate_up_proj"):
            raise ValueError(f"{type(experts).__name__} has no fused gate_up_proj (has_gate=False): use "
                             "UpOnlyExpertsLayout")

    def _sizes(self, experts: nn.Module) -> tuple[int, int, int]:
        E = experts.gate_up_proj.shape[0]
        H, I = experts.down_proj.shape[-2:]  # [E, H, I]
        return (E, I, H) if self.transposed else (E, H, I)  # transposed: down_proj [E, I, H]

    def _check_gate(self) -> None:
        """Raise unless up/gate/combine equal the class's own `_apply_gate` exactly, clamps included."""
        apply_gate = getattr(type(self.module), "_apply_gate", None)
        if apply_gate is None:
            return
        torch.manual_seed(0)  # a fixed probe: standard normal rows, then rows wide enough to pass any clamp
        probe = torch.cat([torch.randn(8, 2 * self.intermediate_size),
                           torch.randn(8, 2 * self.intermediate_size) * 60.0])
        name = type(self.module).__name__
        with torch.no_grad():
            try:
                want = apply_gate(self.module, probe)
                gate_pre, up_pre = self._split(probe, -1)
                got = self.combine(self.up(up_pre), self.gate(gate_pre)).to(want.dtype)
            except TypeError as err:
                raise UnsupportedArchitecture(f"{name}'s gate is not σ(gate) ⊙ up ({err}); moeprof has no exact layout for it, "
                                 "so it refuses to profile it approximately") from None
        if not torch.equal(got, want):
            err = float((got - want).abs().max())
            raise UnsupportedArchitecture(f"{name}'s own _apply_gate differs from {type(self).__name__}'s GLU (max error {err:.3g} "
                             "on a probe reaching its clamps); moeprof refuses to profile it approximately: add its "
                             "Layout to moeprof.arch.layout.LAYOUTS")

    def _split(self, gate_up: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (gate, up) views of a fused gate/up tensor along `dim` (0 or -1)."""
        if self.concatenated:
            return gate_up.chunk(2, dim=dim)
        pairs = gate_up.unflatten(dim, (-1, 2))  # interleaved: (gate_j, up_j) pairs, [..., I, 2, ...]
        return pairs.unbind(1 if dim == 0 else -1)

    @property
    def kernel_ok(self) -> bool:
        from moeprof.kernels.reference import KERNEL_ACTIVATIONS

        return (self.plain_glu and self.concatenated and not self.transposed and not self.has_bias
                and self.post_norm is None and self.activation in KERNEL_ACTIVATIONS)

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.kernel_ok:
            return super().kernel_weights()
        return self.module.gate_up_proj, self.module.down_proj

    def weights(self, expert: int) -> GLUWeights:
        self._check(expert)
        gate_up, down = self.module.gate_up_proj[expert], self.module.down_proj[expert]  # [2I, H], [H, I]
        if self.transposed:
            gate_up, down = gate_up.t(), down.t()
        gate, up = self._split(gate_up, 0)
        return GLUWeights(gate, up, down)

    def biases(self, expert: int) -> GLUBiases | None:
        self._check(expert)
        if not self.has_bias:
            return None
        gate, up = self._split(self.module.gate_up_proj_bias[expert], 0)
        return GLUBiases(gate, up, self.module.down_proj_bias[expert])

    def project_grouped(self, x_g, counts):
        m = self.module
        gate_up = grouped_linear(x_g, m.gate_up_proj, m.gate_up_proj_bias if self.has_bias else None, counts,
                                 self.transposed)  # [S, 2I]
        return self._split(gate_up, -1)

    def down_grouped(self, i_g, counts):
        m = self.module
        y = grouped_linear(i_g, m.down_proj, m.down_proj_bias if self.has_bias else None, counts, self.transposed)
        return y if self.post_norm is None else self.post_norm(y)


class _LimitedGLU:
    """The clamp bound L of a clamped GLU's experts module (`limit`, or `swiglu_limit` in some families); None
    where the module has no clamp (Step-3.7 since transformers 5.25: a zero or missing per-layer limit)."""

    @property
    def limit(self) -> float | None:
        m = self.module
        value = m.limit if hasattr(m, "limit") else m.swiglu_limit
        return None if value is None else float(value)


class ClampedGLULayout(_LimitedGLU, FusedExpertsLayout):
    """A SwiGLU clamped at `limit` (DeepSeek-V4, GLM-5-Next, HY-V4): u = clamp(W_u x, ±L), g = σ(min(W_g x, L)),
    i = g ⊙ u. σ is the module's `act_fn`, SiLU where it has none (GLM-5-Next, HY-V4 call F.silu)."""

    plain_glu = False
    glu_name = "clamped_swiglu"

    def up(self, up_pre):
        if self.limit is None:
            return up_pre
        return up_pre.clamp(min=-self.limit, max=self.limit)

    def gate(self, gate_pre):
        if self.limit is None:
            return (self.act_fn or F.silu)(gate_pre)
        return (self.act_fn or F.silu)(gate_pre.clamp(max=self.limit))


class ClampedAfterActGLULayout(ClampedGLULayout):
    """Step-3.7's clamped GLU: u = clamp(W_u x, ±L), g = min(σ(W_g x), L), i = g ⊙ u; with no limit on a layer
    (L = None), the plain GLU."""

    def gate(self, gate_pre):
        g = (self.act_fn or F.silu)(gate_pre)
        return g if self.limit is None else g.clamp(max=self.limit)


class GptOssGLULayout(_LimitedGLU, FusedExpertsLayout):
    """GPT-OSS's clamped SwiGLU (also OpenAI privacy filter, MiniMax-M3-VL): with c = min(W_g x + b_g, L),
    u = clamp(W_u x + b_u, ±L) + 1, g = c · sigmoid(α c), i = g ⊙ u (what enters down_proj)."""

    plain_glu = False
    glu_name = "gpt_oss_swiglu"

    @property
    def alpha(self) -> float:
        m = self.module
        return float(m.alpha if hasattr(m, "alpha") else m.swiglu_alpha)

    def up(self, up_pre):
        return up_pre.clamp(min=-self.limit, max=self.limit) + 1

    def gate(self, gate_pre):
        c = gate_pre.clamp(max=self.limit)
        return c * torch.sigmoid(c * self.alpha)

    def combine(self, u, g):
        return u * g  # the class's own order, (up + 1) * glu


class Fp32GLULayout(FusedExpertsLayout):
    """Beam: σ(gate) ⊙ up computed in fp32, then cast back (u and g are the fp32 values)."""

    plain_glu = False

    def up(self, up_pre):
        return up_pre.float()

    def gate(self, gate_pre):
        return self.act_fn(gate_pre.float())

    def combine(self, u, g):
        return (g * u).to(self.module.down_proj.dtype)


class SoftcappedGLULayout(FusedExpertsLayout):
    """Inkling-2's softcapped SwiGLU, in fp32: u = capᵤ(W_u x), g = cap_g(W_g x) · sigmoid(W_g x), i = g ⊙ u (cast
    back to the weights' dtype); its `act_fn` takes (gate, up) and holds both softcaps."""

    plain_glu = False
    glu_name = "softcapped_swiglu"

    def __init__(self, experts, activation=None):
        self._glu = experts.act_fn
        super().__init__(experts, activation)

    def _check_storage(self, experts):
        super()._check_storage(experts)

    def up(self, up_pre):
        return self._glu.up_softcap(up_pre.float())

    def gate(self, gate_pre):
        g = gate_pre.float()
        return self._glu.gate_softcap(g) * torch.sigmoid(g)

    def combine(self, u, g):
        return (g * u).to(self.module.down_proj.dtype)


class UpOnlyExpertsLayout(FusedExpertsLayout):
    """Non-gated experts (`has_gate=False`, Nemotron-H): `up_proj` [E, I, H], `down_proj` [E, H, I], i = σ(W_u x).

    The site has three activation types: x, u = W_u x and i = σ(u) (σ = ReLU² in Nemotron-H); there is no g.
    """

    plain_glu = False
    types = ("x", "u", "i")

    def _check_storage(self, experts):
        if not hasattr(experts, "up_proj"):
            raise ValueError(f"{type(experts).__name__} (has_gate=False) has no up_proj")

    def _sizes(self, experts):
        E = experts.up_proj.shape[0]
        H, I = experts.down_proj.shape[-2:]
        return (E, I, H) if self.transposed else (E, H, I)

    def _check_gate(self):
        return None  # no gate: i = act_fn(u), the decorator's own non-gated path

    @property
    def flops_per_token(self) -> int:
        return 2 * self.hidden_size * self.intermediate_size

    def weights(self, expert):
        self._check(expert)
        up, down = self.module.up_proj[expert], self.module.down_proj[expert]
        if self.transposed:
            up, down = up.t(), down.t()
        return GLUWeights(None, up, down)

    def biases(self, expert):
        self._check(expert)
        if not self.has_bias:
            return None
        return GLUBiases(None, self.module.up_proj_bias[expert], self.module.down_proj_bias[expert])

    def project_grouped(self, x_g, counts):
        m = self.module
        up = grouped_linear(x_g, m.up_proj, m.up_proj_bias if self.has_bias else None, counts, self.transposed)
        return None, up

    def gate(self, gate_pre):
        return None

    def combine(self, u, g):
        return self.act_fn(u)


class DenseMLPLayout(Layout):
    """A dense GLU MLP (Llama style): `gate_proj`, `up_proj`, `down_proj` nn.Linear and `act_fn`; one expert.

    Capture observes this module's own forward through hooks at `taps()`; the GLU here is what tolerance uses.
    """

    def __init__(self, mlp: nn.Module, activation: str | None, act_fn=None):
        super().__init__(mlp, activation, 1, mlp.up_proj.in_features, mlp.up_proj.out_features, act_fn=act_fn)

    def taps(self) -> dict[str, tuple[nn.Module, str]]:
        """Return, per activation type, the submodule whose forward carries it and where: "input" or "output"."""
        m = self.module
        return {"x": (m, "input"), "u": (m.up_proj, "output"), "g": (m.act_fn, "output"), "i": (m.down_proj, "input")}

    def weights(self, expert: int) -> GLUWeights:
        self._check(expert)
        m = self.module
        return GLUWeights(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)

    def biases(self, expert: int) -> GLUBiases | None:
        self._check(expert)
        m = self.module
        if m.up_proj.bias is None:
            return None
        return GLUBiases(m.gate_proj.bias, m.up_proj.bias, m.down_proj.bias)

    def project_grouped(self, x_g, counts):
        m = self.module
        return _linear(x_g, m.gate_proj.weight, m.gate_proj.bias), _linear(x_g, m.up_proj.weight, m.up_proj.bias)

    def down_grouped(self, i_g, counts):
        m = self.module
        return _linear(i_g, m.down_proj.weight, m.down_proj.bias)


# experts class name → its Layout, for families whose storage or GLU differs from FusedExpertsLayout's reading
# of the decorator flags (e.g. a clamped SwiGLU); every other decorated experts class takes the default.
LAYOUTS: dict[str, type[FusedExpertsLayout]] = {
    "GptOssExperts": GptOssGLULayout, "OpenAIPrivacyFilterExperts": GptOssGLULayout,
    "MiniMaxM3VLExperts": GptOssGLULayout,
    "DeepseekV4Experts": ClampedGLULayout, "Glm5NextTextExperts": ClampedGLULayout, "HYV4Experts": ClampedGLULayout,
    "HYV4VLExperts": ClampedGLULayout, "Step3p7Experts": ClampedAfterActGLULayout,
    "BeamExperts": Fp32GLULayout,
    "Inkling2Experts": SoftcappedGLULayout, "Inkling2LoopExperts": SoftcappedGLULayout,
}


def experts_layout(experts: nn.Module, activation: str | None = None) -> FusedExpertsLayout:
    """Return the Layout of a fused experts module (by its class name in `LAYOUTS`, else by its decorator flags).

    Every layout checks itself against the class's own `_apply_gate`, so a class whose gate differs from its
    layout's GLU (a clamp, a two-argument activation, …) is refused, never profiled approximately.
    """
    name = type(experts).__name__
    if name in LAYOUTS:
        return LAYOUTS[name](experts, activation)
    if not getattr(experts, "has_gate", True):
        return UpOnlyExpertsLayout(experts, activation)
    return FusedExpertsLayout(experts, activation)
