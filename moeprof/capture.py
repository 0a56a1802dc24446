"""Observe — and optionally sparsify — x/u/g/i at every FFN site, through transformers' own extension points.

Legend: T = tokens in a forward, K = experts per token, S = T·K routed (token, expert) pairs, H = hidden,
I = expert FFN width, L = layers, E = experts per layer, P = p-grid size.

- MoE layers (transformers 5 fused experts): a function registered in the `ExpertsInterface` under the name
  "moeprof" and selected with `model.set_experts_implementation`. It runs the experts itself (grouped by expert,
  one GEMM per expert, through the site's Layout), so it sees, per routed pair, the expert's x, u, g and i as the
  layout defines them (u = W_u x, g = σ(W_g x), i = u ⊙ g for a plain GLU) at no extra matmul cost. On exit
  the model's previous implementation is restored and the registration undone.
- Dense layers: `register_forward_pre_hook` / `register_forward_hook` handles on the MLP and its projections
  (where the site's layout `taps()` them), all removed on exit.
Nothing is replaced for the whole process; other models keep running their stock forward.

Sparsifying x of an MoE expert sparsifies that expert's copy of its input only: the router still sees dense x.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from moeprof.arch import Site, adapter_for
from moeprof.errors import InvalidArgument, MoeprofError
from moeprof.stats import ACTIVATION_TYPES, Observation, ProfileStats, TraceRecorder, VectorSummary
from moeprof.rules import rule
from moeprof.topp import rule_mask

EXPERTS_IMPL = "moeprof"
_ENGINE_ATTR = "_moeprof_engine"


# ----------------------------------------------------------------------------------------------------------
# What to do at the sites


@dataclass
class Realized:
    """Sparsity actually realized while sparsifying, per (layer, expert): counts and sums over vectors."""

    tokens: torch.Tensor  # [L, E] int64 vectors sparsified
    sparsity_sum: torch.Tensor  # [L, E] float64 sum of per-vector realized sparsity
    flops_per_token: torch.Tensor  # [L] float64 multiply-adds of one token through one expert of the layer
    dense_tokens: torch.Tensor | None = None  # [L, E] int64 vectors that went through an expert left dense (NaN p)

    @classmethod
    def empty(cls, sites: Sequence[Site]) -> "Realized":
        L, E = len(sites), max(s.num_experts for s in sites)
        return cls(torch.zeros(L, E, dtype=torch.long), torch.zeros(L, E, dtype=torch.float64),
                   torch.tensor([float(s.flops_per_token) for s in sites], dtype=torch.float64),
                   torch.zeros(L, E, dtype=torch.long))

    def add_dense(self, layer: int, expert_ids: torch.Tensor) -> None:
        if self.dense_tokens is None:
            self.dense_tokens = torch.zeros_like(self.tokens)
        ids = expert_ids.reshape(-1).long().cpu()
        self.dense_tokens[layer].index_add_(0, ids, torch.ones_like(ids))

    @property
    def overall_flop_weighted(self) -> float:
        """FLOP-weighted realized sparsity of ALL the FFN work of the forwards, vectors of experts left dense (NaN
        p) counting as sparsity 0: the model-wide figure a schedule is judged by (= `flop_weighted` when nothing
        is left dense)."""
        dense = 0 if self.dense_tokens is None else self.dense_tokens
        w = (self.tokens + dense).double() * self.flops_per_token[:, None]
        return float((self.sparsity_sum * self.flops_per_token[:, None]).sum() / w.sum()) if w.sum() else float("nan")

    def add(self, layer: int, expert_ids: torch.Tensor, sparsity: torch.Tensor) -> None:
        ids = expert_ids.reshape(-1).long().cpu()
        self.tokens[layer].index_add_(0, ids, torch.ones_like(ids))
        self.sparsity_sum[layer].index_add_(0, ids, sparsity.reshape(-1).double().cpu())

    @property
    def token_weighted(self) -> float:
        """Mean realized sparsity over all sparsified (token, expert) vectors."""
        n = int(self.tokens.sum())
        return float(self.sparsity_sum.sum()) / n if n else float("nan")

    @property
    def flop_weighted(self) -> float:
        """Realized sparsity weighted by the FFN work each vector stands for (tokens × expert FLOPs)."""
        w = self.tokens.double() * self.flops_per_token[:, None]
        return float((self.sparsity_sum * self.flops_per_token[:, None]).sum() / w.sum()) if w.sum() else float("nan")

    def per_expert(self) -> torch.Tensor:
        """Return realized sparsity [L, E] per expert (NaN where an expert was never sparsified)."""
        n = self.tokens.double()
        return torch.where(n > 0, self.sparsity_sum / n.clamp(min=1), torch.full_like(n, float("nan")))


@dataclass
class SparsifyPlan:
    """Apply `rule` with parameter p_table[layer, expert] to activation `type`; NaN entries stay dense."""

    type: str
    rule: str
    p_table: torch.Tensor  # [L, E] float64

    def __post_init__(self):
        if self.type not in ACTIVATION_TYPES:
            raise InvalidArgument(f"unknown activation type {self.type!r}; choose one of {', '.join(ACTIVATION_TYPES)}")
        r = rule(self.rule)
        finite = self.p_table[~self.p_table.isnan()]
        if not r.fraction:  # the parameter is a magnitude τ, not a fraction
            if finite.numel() and not bool(((finite >= 0) & finite.isfinite()).all()):
                raise InvalidArgument("a magnitude threshold τ must be a finite number >= 0 for every sparsified expert")
        elif finite.numel() and (bool((finite < 0).any()) or bool((finite > 1).any())):
            raise InvalidArgument("p must lie in [0, 1] for every sparsified expert")


NONFINITE_MODES = ("error", "skip")


class NonFiniteActivation(MoeprofError, ValueError):
    """An activation vector holding NaN or Inf (the message names layer, expert, type and token)."""


def all_finite(v: torch.Tensor) -> bool:
    """Return True when every entry of v is finite: one sum per row (NaN and ±Inf propagate into it), then the
    entries themselves only when a sum is not finite (a row of huge finite values can overflow its sum)."""
    if v.numel() == 0:
        return True
    if bool(torch.isfinite(v.sum(dim=-1, dtype=torch.float32)).all()):
        return True
    return bool(torch.isfinite(v).all())


class Engine:
    """Observation and sparsification state of one capture context, shared by all of a model's sites."""

    def __init__(self, sites: Sequence[Site], stats: ProfileStats | None = None,
                 trace: TraceRecorder | None = None, plan: SparsifyPlan | None = None, use_kernel: bool = True,
                 observers: Sequence = (), on_nonfinite: str = "error"):
        """`observers`: further objects fed every Observation through `add(obs)`, outside the profile (e.g.
        `moeprof.critical.RoutedTokens`); each names the activation `type` it observes. `on_nonfinite`: "error"
        stops at the first observed vector holding NaN/Inf, "skip" leaves such vectors out and counts them in
        `nonfinite[type]`."""
        if on_nonfinite not in NONFINITE_MODES:
            raise InvalidArgument(f"on_nonfinite must be one of {', '.join(NONFINITE_MODES)}, got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.nonfinite: dict[str, int] = {}
        self.batch_shape: tuple[int, int] | None = None  # [B, S] of the forward running (for token positions)
        self.sites = list(sites)
        self.use_kernel = use_kernel
        self.stats = stats
        self.trace = trace
        self.plan = plan
        self.observers = list(observers)
        self.realized = Realized.empty(sites) if plan is not None else None
        self.observed = (set(stats.types) if stats is not None else set()) | {o.type for o in self.observers}
        self.p_grid = tuple(stats.p_grid) if stats is not None else ()
        #: row → (experts this rank runs, global id of its first) for experts split by expert parallelism
        self.expert_range: dict[int, tuple[int, int]] = {}
        self._kernel_p: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, bool]] = {}

    def kernel_p(self, site: Site, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Return the grouped kernel's p [E] fp32 on `device` for a site (1 where the plan leaves an expert dense),
        the mask [E] of the experts the plan sparsifies, and whether that is all of them — built once per site
        (the plan is fixed for the engine's life)."""
        key = (site.row, str(device))
        if key not in self._kernel_p:
            p_row = self.plan.p_table[site.row, :site.num_experts]  # [E], NaN = expert left dense
            active = ~p_row.isnan()
            p = torch.where(active, p_row, torch.ones_like(p_row)).float().to(device)
            self._kernel_p[key] = (p, active, bool(active.all()))
        return self._kernel_p[key]

    @property
    def observing(self) -> bool:
        """True when anything is fed observations (a profile, a trace or an observer)."""
        return self.stats is not None or self.trace is not None or bool(self.observers)

    def touches(self, type: str) -> bool:
        return type in self.observed or (self.plan is not None and self.plan.type == type)

    def _feed(self, obs: Observation) -> None:
        """Give one observation to every accumulator of the profile, to the trace and to the observers."""
        if self.stats is not None:
            self.stats.add(obs)
        if self.trace is not None:
            self.trace.add(obs)
        for observer in self.observers:
            observer.add(obs)

    def routing(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        if self.observing:
            self._feed(Observation.routing(layer, top_k_index, top_k_weights))

    def observe(self, layer: int, type: str, expert_ids: torch.Tensor, summary: VectorSummary | None,
                token_idx: torch.Tensor, slot: torch.Tensor, vectors: torch.Tensor | None = None) -> None:
        """Feed rows already summarized (e.g. one p-curve per token shared by its K experts; None: computed from
        `vectors` on first request); `vectors` [N, D] for accumulators and observers that read raw rows."""
        self._feed(Observation(layer, type, expert_ids, token_idx, slot, vectors=vectors, summary=summary,
                               p_grid=self.p_grid))

    def finite_rows(self, layer: int, type: str, v: torch.Tensor, expert_ids: torch.Tensor,
                    token_idx: torch.Tensor) -> torch.Tensor | None:
        """Return None when every row of v [N, D] is finite; else the mask [N] of finite rows ("skip": the others
        are counted in `nonfinite[type]`) or raise NonFiniteActivation naming the first bad row ("error")."""
        if v.numel() == 0 or all_finite(v):
            return None
        ok = torch.isfinite(v).all(dim=-1)  # [N]
        row = int((~ok).nonzero()[0, 0])
        tok = int(token_idx[row])
        site = next((s for s in self.sites if s.row == layer), None)  # `layer` is the site's row
        where = (f"layer {layer if site is None else site.layer}"
                 + ("" if site is None or site.is_routed else f" ({site.kind})")
                 + f", expert {int(expert_ids[row])}, type {type}, token {tok} of the batch")
        if self.batch_shape is not None:
            seq, pos = divmod(tok, self.batch_shape[1])
            where += f" (sequence {seq} of the batch, position {pos})"
        if self.on_nonfinite != "skip":
            raise NonFiniteActivation(f"NaN or Inf in the activations at {where}; check the model's dtype (float16 "
                                      "overflow is the usual cause), or (`moeprof profile`: the one command that "
                                      "can) pass --on-nonfinite skip to count and skip such vectors")
        self.nonfinite[type] = self.nonfinite.get(type, 0) + int((~ok).sum())
        return ok

    def process(self, layer: int, type: str, v: torch.Tensor, expert_ids: torch.Tensor,
                token_idx: torch.Tensor, slot: torch.Tensor, observe: bool = True) -> torch.Tensor:
        """Observe v [N, D] (rows routed to expert_ids [N]) and return it, sparsified if the plan says so."""
        if observe and type in self.observed:
            keep = self.finite_rows(layer, type, v, expert_ids, token_idx)
            if keep is None:
                self._feed(Observation(layer, type, expert_ids, token_idx, slot, vectors=v, p_grid=self.p_grid))
            else:
                self._feed(Observation(layer, type, expert_ids[keep], token_idx[keep], slot[keep], vectors=v[keep],
                                       p_grid=self.p_grid))
        if self.plan is None or self.plan.type != type:
            return v
        p_rows = self.plan.p_table[layer].to(v.device)[expert_ids]  # [N]
        active = ~p_rows.isnan()
        self.realized.add_dense(layer, expert_ids[~active])
        if not bool(active.any()):
            return v
        mask = torch.ones_like(v, dtype=torch.bool)
        mask[active] = rule_mask(v[active].float(), self.plan.rule, p_rows[active])
        self.realized.add(layer, expert_ids[active], 1.0 - mask[active].sum(-1).double() / v.shape[-1])
        return v * mask


# ----------------------------------------------------------------------------------------------------------
# MoE: a registered experts implementation


def _kernel_applies(engine: Engine, site: Site) -> bool:
    """True when sparsification alone is asked and `moeprof.kernels.grouped_topp_glu` computes exactly that."""
    plan = engine.plan
    return (engine.use_kernel and plan is not None and not engine.observing and site.row not in engine.expert_range
            and rule(plan.rule).kernel and plan.type in ("x", "i") and site.layout.kernel_ok)


def _moe_forward_kernel(engine: Engine, site: Site, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """Sparsified experts through the grouped top-p kernel (Triton on CUDA, the torch fast path on the CPU)."""
    from moeprof.kernels import grouped_topp_glu

    p, active, all_active = engine.kernel_p(site, hidden_states.device)
    gate_up, down = site.layout.kernel_weights()  # [E, 2I, H], [E, H, I]
    y, realized = grouped_topp_glu(hidden_states, top_k_index, top_k_weights, gate_up, down, p,
                                   sparsify=engine.plan.type, act=site.activation,
                                   return_stats=True)  # y [T, H], realized [T, K]
    pair_expert = top_k_index.reshape(-1).cpu()  # [S]
    if all_active:  # (the usual case; a decode step pays for every call here)
        engine.realized.add(site.row, pair_expert, realized.reshape(-1).cpu())
        return y
    chosen = active[pair_expert]
    engine.realized.add(site.row, pair_expert[chosen], realized.reshape(-1).cpu()[chosen])
    engine.realized.add_dense(site.row, pair_expert[~chosen])
    return y


def _moe_forward(engine: Engine, site: Site, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
    if _kernel_applies(engine, site):
        return _moe_forward_kernel(engine, site, hidden_states, top_k_index, top_k_weights)
    layout = site.layout
    T, H = hidden_states.shape  # [T, H]
    K = top_k_index.shape[-1]
    layer = site.row  # the site's row of the profile arrays
    E, offset = engine.expert_range.get(site.row, (layout.num_experts, 0))  # experts run here, first global id

    flat_ids = top_k_index.reshape(-1)  # [T·K] local ids
    local = flat_ids < E  # expert parallelism marks pairs routed to another rank's experts with ids ≥ E: dropped
    all_local = bool(local.all())
    if all_local:
        engine.routing(layer, top_k_index + offset, top_k_weights)
        order = torch.argsort(flat_ids, stable=True)  # [S] pairs grouped by expert
    else:
        pairs = local.nonzero().squeeze(-1)
        if engine.observing:
            engine._feed(Observation(layer, None, flat_ids[pairs].long() + offset, pairs // K, pairs % K,
                                     weights=top_k_weights.reshape(-1)[pairs].detach().double(), num_tokens=T))
        order = pairs[torch.argsort(flat_ids[pairs], stable=True)]
    counts = torch.bincount(flat_ids[order], minlength=E).tolist()  # pairs per local expert (the weights' rows)
    ids_g = flat_ids[order] + offset  # [S] global expert ids: the rows of the statistics and of the p table
    tok_g, slot_g = order // K, order % K  # [S]

    x_g = hidden_states[tok_g]  # [S, H] each expert's copy of its tokens
    if "x" in engine.observed:
        # One p-curve per token, shared by the K experts it went to (only a profile or trace reads it); the rows
        # go along as they are (the expert's input, built anyway) for observers that read raw vectors.
        # Finite tokens make finite copies: the T tokens are checked, not their T·K copies, unless one is not.
        keep = None if all_finite(hidden_states) else engine.finite_rows(layer, "x", x_g, ids_g, tok_g)
        hs = hidden_states if keep is None else torch.nan_to_num(hidden_states, nan=0.0, posinf=0.0, neginf=0.0)
        summary = (VectorSummary.of(hs, engine.p_grid).select(tok_g)
                   if engine.stats is not None or engine.trace is not None else None)
        if keep is None:
            engine.observe(layer, "x", ids_g, summary, tok_g, slot_g, vectors=x_g)
        else:
            engine.observe(layer, "x", ids_g[keep], None if summary is None else summary.select(keep.nonzero()[:, 0]),
                           tok_g[keep], slot_g[keep], vectors=x_g[keep])
    x_g = engine.process(layer, "x", x_g, ids_g, tok_g, slot_g, observe=False)  # [S, H]

    gate_pre, up_pre = layout.project_grouped(x_g, counts)  # [S, I] each (gate_pre None: a non-gated expert)
    u = engine.process(layer, "u", layout.up(up_pre), ids_g, tok_g, slot_g)
    g = layout.gate(gate_pre)
    if g is not None:
        g = engine.process(layer, "g", g, ids_g, tok_g, slot_g)
    i = engine.process(layer, "i", layout.combine(u, g), ids_g, tok_g, slot_g)  # [S, I]
    out = layout.down_grouped(i, counts)  # [S, H]
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)  # [S, H]

    unsorted = out.new_zeros(T * K, H) if not all_local else torch.empty_like(out)
    unsorted[order] = out
    # Same reduction as transformers' grouped/batched implementations (sum over the K slots of each token).
    return unsorted.view(T, K, H).sum(dim=1).to(hidden_states.dtype)


def expert_parallel_rank(experts: nn.Module) -> int:
    """Return this process's coordinate on the device mesh over which expert parallelism split `experts` (its
    weights are DTensors sharded on the expert dim), else its torch.distributed rank."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no expert parallelism either
        return 0
    for param in experts.parameters():
        if isinstance(param, DTensor):
            return int(param.device_mesh.get_local_rank())
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def expert_parallel_range(experts: nn.Module) -> tuple[int, int]:
    """Return (E_local, offset) of experts that transformers' expert parallelism split
    (`distributed/expert_parallel.py`): its `num_experts` is then the local count, its forward gets local ids
    with the other ranks' pairs marked `num_experts` (dropped), and local expert e is global expert
    offset + e, offset = rank × E_local."""
    local = int(experts.num_experts)
    return local, expert_parallel_rank(experts) * local


def moeprof_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "moeprof" entry of transformers' ExpertsInterface: runs the experts through this module's engine."""
    bound = getattr(self, _ENGINE_ATTR, None)
    if bound is None:
        raise RuntimeError("experts implementation 'moeprof' is only valid inside a moeprof capture context; "
                           "call model.set_experts_implementation('grouped_mm') to run it stock")
    engine, site = bound
    return _moe_forward(engine, site, hidden_states, top_k_index, top_k_weights)


_registry_lock = threading.Lock()
_registry_users = 0


@contextlib.contextmanager
def _experts_interface_entry() -> Iterator[None]:
    """Register "moeprof" in transformers' ExpertsInterface for the duration (reference-counted, then removed)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    global _registry_users
    with _registry_lock:
        if _registry_users == 0:
            ALL_EXPERTS_FUNCTIONS[EXPERTS_IMPL] = moeprof_experts_forward
        _registry_users += 1
    try:
        yield
    finally:
        with _registry_lock:
            _registry_users -= 1
            if _registry_users == 0:
                del ALL_EXPERTS_FUNCTIONS[EXPERTS_IMPL]


# ----------------------------------------------------------------------------------------------------------
# Dense: hook handles


def _dense_hooks(engine: Engine, site: Site) -> list[torch.utils.hooks.RemovableHandle]:
    """Return hook handles that observe (and sparsify) x/u/g/i where the site's layout taps its module's forward."""
    layer = site.row

    def run(type: str, v: torch.Tensor) -> torch.Tensor:
        flat = v.reshape(-1, v.shape[-1])  # [B·S, D]
        n = flat.shape[0]
        zeros = torch.zeros(n, dtype=torch.long, device=v.device)
        return engine.process(layer, type, flat, zeros, torch.arange(n, device=v.device), zeros).view_as(v)

    def route(m, args):  # a dense layer routes every token to its one "expert" with weight 1
        n = args[0].shape[:-1].numel()
        engine.routing(layer, torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1))

    def on_input(type):
        return lambda m, args: (run(type, args[0]),) + tuple(args[1:])

    def on_output(type):
        return lambda m, args, out: run(type, out)

    handles = []
    if engine.observing:
        handles.append(site.module.register_forward_pre_hook(route))
    for type, (module, where) in site.layout.taps().items():
        if engine.touches(type):
            handles.append(module.register_forward_pre_hook(on_input(type)) if where == "input"
                           else module.register_forward_hook(on_output(type)))
    return handles


# ----------------------------------------------------------------------------------------------------------
# Public context managers


def _experts_implementation(model: nn.Module) -> dict:
    """Return the model's experts implementation per (sub-)config, as `get_experts_implementation` gives it."""
    get = getattr(model, "get_experts_implementation", None)
    return get() if callable(get) else {"": getattr(model.config, "_experts_implementation", None)}


def _restore_experts_implementation(model: nn.Module, previous: dict) -> None:
    """Put back each (sub-)config's experts implementation (the root first: its setter updates sub-configs)."""
    for key, impl in previous.items():
        config = model.config if key == "" else getattr(model.config, key, None)
        if config is None or config._experts_implementation == impl:
            continue
        if impl is None:  # e.g. a model built for training with experts_implementation=None
            config._experts_implementation = None
        else:
            model.set_experts_implementation(impl if key == "" else {key: impl})


@contextlib.contextmanager
def attach(model: nn.Module, engine: Engine) -> Iterator[Engine]:
    """Run `engine` at every FFN site of `model` for the duration; restore the model exactly on exit."""
    sites = engine.sites
    moe_sites = [s for s in sites if s.is_routed]
    hooked = [s for s in sites if not s.is_routed]
    taps = [id(module) for s in hooked for module, _ in s.layout.taps().values()]
    if len(set(taps)) != len(taps):
        raise RuntimeError("dense MLPs share one activation module; moeprof cannot tell their layers apart")
    # Refuse a nested context before touching anything, so that the refusal leaves the open one exactly as it is.
    bound = [s.experts if s.is_routed else s.module for s in sites]
    if any(getattr(m, _ENGINE_ATTR, None) is not None for m in bound):
        raise RuntimeError("this model is already inside a moeprof capture or sparsify context; "
                           "nest them by combining observation and sparsification in one engine")
    handles: list = []
    previous_impl = _experts_implementation(model)
    with contextlib.ExitStack() as stack:
        try:
            for m, s in zip(bound, sites):
                setattr(m, _ENGINE_ATTR, (engine, s))
            if moe_sites:
                stack.enter_context(_experts_interface_entry())
                for s in moe_sites:
                    if getattr(s.experts, "_is_expert_parallel", False):
                        engine.expert_range[s.row] = expert_parallel_range(s.experts)
                model.set_experts_implementation(EXPERTS_IMPL)
            for s in hooked:
                handles += _dense_hooks(engine, s)
            yield engine
        finally:
            for h in handles:
                h.remove()
            for m in bound:
                m.__dict__.pop(_ENGINE_ATTR, None)
            if moe_sites:
                _restore_experts_implementation(model, previous_impl)


def p_table(sites: Sequence[Site], p: float | torch.Tensor, layers: Sequence[int] | None = None,
            experts: Sequence[int] | None = None) -> torch.Tensor:
    """Return the [L, E] table of p per (layer, expert); NaN marks sites left dense (not chosen, or padding)."""
    L, E = len(sites), max(s.num_experts for s in sites)  # L: one row per site
    table = torch.full((L, E), float("nan"), dtype=torch.float64)
    try:
        p_t = torch.as_tensor(p, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgument(f"p must be a number in [0, 1] or a [layers, experts] = [{L}, {E}] table of them, got "
                         f"{type(p).__name__} {str(p)[:60]!r}") from None
    if p_t.dim() not in (0, 2) or (p_t.dim() == 2 and tuple(p_t.shape) != (L, E)):
        raise InvalidArgument(f"a per-expert p table must have shape [layers, experts] = [{L}, {E}], got {list(p_t.shape)}")
    if p_t.dim() == 0 and bool(p_t.isnan()):
        raise InvalidArgument("p is NaN; give a number in [0, 1] (NaN marks a dense expert only inside a per-expert "
                         "table)")
    if experts is not None:
        bad = [e for e in experts if isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < E]
        if bad:
            raise InvalidArgument(f"experts {bad} do not exist; the model has experts 0..{E - 1}")
    for s in sites:
        if layers is not None and s.layer not in layers:
            continue
        chosen = range(s.num_experts) if experts is None else [e for e in experts if e < s.num_experts]
        for e in chosen:
            table[s.row, e] = p_t[s.row, e] if p_t.dim() == 2 else p_t
    if layers is not None:
        num_layers = max(s.layer for s in sites) + 1
        bad = [l for l in layers if not 0 <= l < num_layers]
        if bad:
            raise InvalidArgument(f"layers {bad} do not exist; the model has layers 0..{num_layers - 1}")
    return table


@contextlib.contextmanager
def profile_capture(model: nn.Module, stats: ProfileStats, *, trace: TraceRecorder | None = None,
                    sites: Sequence[Site] | None = None, on_nonfinite: str = "error") -> Iterator[Engine]:
    """Observe x/u/g/i (the types of `stats`) at every FFN site into `stats` while the context is open."""
    sites = adapter_for(model).sites(model) if sites is None else sites
    with attach(model, Engine(sites, stats=stats, trace=trace, on_nonfinite=on_nonfinite)) as engine:
        yield engine


@contextlib.contextmanager
def sparsify(model: nn.Module, *, type: str, rule: str = "topp", p: float | torch.Tensor = 1.0,
             layers: Sequence[int] | None = None, experts: Sequence[int] | None = None,
             stats: ProfileStats | None = None, use_kernel: bool = True) -> Iterator[Realized]:
    """Apply `rule` (topp / topk / maxp / threshold, `moeprof.rules`) with parameter p to activation `type` at every
    FFN site (or the chosen layers / experts) while open; yield a Realized recorder of the sparsity actually
    achieved. For rule "threshold" p is the magnitude τ ≥ 0 (keep |v| ≥ τ): it runs on the torch path (the
    grouped kernel computes top-p only).

    p is a float, or a [layers, experts] tensor of per-expert values (NaN = leave that expert dense): the table
    `p_table` builds. A schedule gives that table through `moeprof.schedule.setting(schedule=...).table(model)`
    (or apply it with `moeprof.schedule.sparsify_`).
    Top-p of x or i in MoE experts runs through `moeprof.kernels.grouped_topp_glu` (Triton on CUDA, the torch
    gather path on the CPU) unless `use_kernel=False` or statistics are captured at the same time; that kernel
    keeps every entry tied with the threshold, so on exact ties it may keep a few more entries than `topp_mask`.
    """
    sites = adapter_for(model).sites(model)
    plan = SparsifyPlan(type, rule, p_table(sites, p, layers, experts))
    lacking = [s.layer for s in sites if type not in s.layout.types and not plan.p_table[s.row].isnan().all()]
    if lacking:
        raise InvalidArgument(f"activation type {type!r} does not exist in layers {lacking} (non-gated experts have x, u "
                         "and i only); sparsify another type or leave those layers out")
    with attach(model, Engine(sites, stats=stats, plan=plan, use_kernel=use_kernel)) as engine:
        yield engine.realized
