"""Per-expert tolerance: each expert's own largest sparsity within a relative output-error budget.

Legend: L = layers, E = experts per layer (1 for a dense FFN), P = grid size, T = tokens routed to one expert,
H = hidden, I = expert FFN width.

`expert_tolerance_of_model(model, sequences)` captures, in one dense forward through `moeprof.capture.attach`,
the hidden states routed to each expert (a `RoutedTokens` observer), then runs each expert alone on them at
every grid p through its site's Layout. `expert_tolerance` does the same from any token / weight source.
`tolerance_split_damage` validates the estimate against real perplexity damage.

Importing this module needs torch and numpy only; the model-side imports happen inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

MAXP_TOLERANCE_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


@dataclass
class ExpertTolerance:
    """Each expert's own tolerance: the largest realized sparsity it keeps within a relative output-error budget.

    Measure: for expert e of layer l and the T tokens routed to it (captured dense), the router-weighted
    relative output error of that expert alone under the rule at p:

        ε_e(p) = ‖w ⊙ (Y_p − Y)‖_F / ‖w ⊙ Y‖_F      (Y [T, H] = the expert's outputs, w [T] = router weights)

    The expert adds w·y to the residual stream, so ε is the relative error it injects into its layer's output
    (for a dense layer w = 1). No model forward is needed: one GLU forward per grid p on the expert's own
    tokens. Tolerance = the largest realized sparsity among the grid points whose error is ≤ budget.
    """

    p_grid: np.ndarray  # [P] ascending
    rel_error: np.ndarray  # [L, E, P] relative output error (NaN: expert saw no tokens)
    sparsity: np.ndarray  # [L, E, P] realized sparsity of the chosen type
    tokens: np.ndarray  # [L, E] routed tokens measured
    budget: float
    type: str
    rule: str

    def _best(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (index [L, E] of the sparsest grid point within budget, whether any point fits [L, E]).

        Taking the largest realized sparsity among the points within budget works for every rule (top-p and
        top-k grow sparser as p falls, max-p as p rises) without assuming the error is monotone in p.
        """
        ok = self.rel_error <= self.budget  # [L, E, P]
        best = np.argmax(np.where(ok, self.sparsity, -np.inf), axis=-1)  # [L, E]
        return best, ok.any(-1)

    @property
    def tolerance_p(self) -> np.ndarray:
        """Return [L, E]: the grid p of the tolerance point (NaN: no data, or no grid p within budget)."""
        best, fits = self._best()
        out = self.p_grid[best].astype(np.float64)
        out[~fits | (self.tokens == 0)] = np.nan
        return out

    @property
    def tolerance_sparsity(self) -> np.ndarray:
        """Return [L, E]: the largest realized sparsity within budget (0 when no grid p fits; NaN: no data)."""
        best, fits = self._best()
        out = np.take_along_axis(self.sparsity, best[..., None], -1)[..., 0].astype(np.float64)
        out = np.where(fits, out, 0.0)
        out[self.tokens == 0] = np.nan
        return out

    def to_dict(self) -> dict:
        """Return plain data (arrays as nested lists)."""
        return {"p_grid": self.p_grid.tolist(), "rel_error": self.rel_error.tolist(),
                "sparsity": self.sparsity.tolist(), "tokens": self.tokens.tolist(), "budget": self.budget,
                "type": self.type, "rule": self.rule, "tolerance_p": self.tolerance_p.tolist(),
                "tolerance_sparsity": self.tolerance_sparsity.tolist()}


def glu_expert_error(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     p_grid: Sequence[float], *, type: str = "i", rule: str = "topp", act: str = "silu",
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (err2 [P], sparsity_sum [P], ref2) of one plain GLU expert, given as matrices, on its own tokens.

    Shapes: x [T, H] tokens routed to the expert, w_gate / w_up [I, H], w_down [H, I], weights [T] router
    weights (None = 1); `act` names σ in `moeprof.activation_functions` (canonical name or a config spelling). The matrices are
    wrapped as a dense MLP's Layout (fp32), so the GLU is the Layout's, as in `layout_expert_error`; see
    `expert_output_error` for the quantities.
    """
    from moeprof.arch.layout import DenseMLPLayout

    mlp = nn.Module()  # what DenseMLPLayout reads: gate_proj, up_proj, down_proj Linear layers
    for name, w in (("gate_proj", w_gate), ("up_proj", w_up), ("down_proj", w_down)):
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(w.detach().float(), requires_grad=False)
        setattr(mlp, name, linear)
    return layout_expert_error(DenseMLPLayout(mlp, act), 0, x, p_grid, type=type, rule=rule, weights=weights)


def layout_expert_error(layout, expert: int, x: torch.Tensor, p_grid: Sequence[float], *, type: str = "i",
                        rule: str = "topp", weights: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (err2 [P], sparsity_sum [P], ref2) of expert `expert` of a site's Layout (`site.layout`) on x [T, H].

    The GLU (u, g, i and the output, biases included) is the layout's own, computed in fp32 (the layout casts
    one expert's weights at a time). See `expert_output_error` for the quantities.
    """
    return expert_output_error(x, lambda v: layout.glu(v, expert), layout.combine,
                               lambda i: layout.down(i, expert), p_grid, type=type, rule=rule, weights=weights)


def expert_output_error(x: torch.Tensor, glu: Callable, combine: Callable, down: Callable,
                        p_grid: Sequence[float], *, type: str = "i", rule: str = "topp",
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (err2 [P], sparsity_sum [P], ref2) of one expert on its own tokens under the rule at each p.

    glu(x) -> (u, g, i), combine(u, g) -> i and down(i) -> y define the expert; x [T, H] are the tokens
    routed to it, weights [T] their router weights (None = 1). err2[p] = Σ_t w_t² ‖y_t(p) − y_t‖²,
    ref2 = Σ_t w_t² ‖y_t‖² (the relative error is sqrt(err2 / ref2)); sparsity_sum[p] = Σ_t realized
    sparsity of the chosen type (divide by T).
    """
    from moeprof.topp import apply_rule

    if type not in ("x", "u", "g", "i"):
        raise ValueError(f"unknown activation type {type!r}; choose one of x, u, g, i")
    x = x.float()
    wt = torch.ones(x.shape[0], device=x.device) if weights is None else weights.float().reshape(-1)  # [T]
    u, g, i = glu(x)  # [T, I] each
    y = down(i).float()  # [T, H]
    ref2 = float(((wt[:, None] * y) ** 2).sum())
    err2, ssum = [], []
    for p in p_grid:
        if type == "x":
            xs, k = apply_rule(x, rule, p)
            ys = down(glu(xs)[2])
        elif type == "u":
            us, k = apply_rule(u, rule, p)
            ys = down(combine(us, g))
        elif type == "g":
            gs, k = apply_rule(g, rule, p)
            ys = down(combine(u, gs))
        else:
            i_s, k = apply_rule(i, rule, p)
            ys = down(i_s)
        n = x.shape[-1] if type == "x" else u.shape[-1]
        err2.append(float(((wt[:, None] * (ys.float() - y)) ** 2).sum()))
        ssum.append(float((1.0 - k.double() / n).sum()))
    return torch.tensor(err2, dtype=torch.float64), torch.tensor(ssum, dtype=torch.float64), ref2


def expert_tolerance(expert_tokens: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]],
                     expert_weights: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     num_layers: int, num_experts: int, *, p_grid: Sequence[float] | None = None,
                     budget: float = 0.05, type: str = "i", rule: str = "topp", act: str = "silu") -> ExpertTolerance:
    """Return each expert's tolerance from captured tokens: relative output error under the rule at every p.

    expert_tokens(layer, expert) -> (x [T, H], router weights [T] or None): the hidden states routed to that
    expert (captured once, dense). expert_weights(layer, expert) -> (w_gate [I, H], w_up [I, H], w_down [H, I])
    of a plain GLU whose σ is `act` (a name in `moeprof.activation_functions`, e.g. "silu", "gelu_tanh"). Cost: one GLU forward
    per grid point per expert on its own tokens, no model forward. The budget is the relative output error each expert may inject (0.05 = 5 %).
    """
    def error(layer, e, x, w, grid):
        return glu_expert_error(x, *expert_weights(layer, e), grid, type=type, rule=rule, act=act, weights=w)

    return _tolerance(expert_tokens, error, num_layers, num_experts, p_grid, budget, type, rule)


def _tolerance(expert_tokens, expert_error, num_layers: int, num_experts: int, p_grid, budget: float, type: str,
               rule: str) -> ExpertTolerance:
    """Return the ExpertTolerance from expert_error(layer, expert, x, weights, grid) -> (err2, ssum, ref2)."""
    if p_grid is None:
        from moeprof.topp import DEFAULT_P_GRID
        # max-p keeps |v| ≥ p·max|v|: dense at p = 0, sparser as p rises, so it needs its own grid
        p_grid = MAXP_TOLERANCE_GRID if rule == "maxp" else DEFAULT_P_GRID
    grid = np.array(sorted(float(p) for p in p_grid), dtype=np.float64)
    if not budget > 0:
        raise ValueError(f"the error budget must be > 0 (a relative output error, e.g. 0.05), got {budget}")
    P = grid.size
    rel = np.full((num_layers, num_experts, P), np.nan)
    spars = np.full((num_layers, num_experts, P), np.nan)
    tokens = np.zeros((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        for e in range(num_experts):
            x, w = expert_tokens(layer, e)
            if x is None or x.shape[0] == 0:
                continue
            err2, ssum, ref2 = expert_error(layer, e, x, w, grid)
            tokens[layer, e] = x.shape[0]
            rel[layer, e] = np.sqrt(err2.numpy() / ref2) if ref2 > 0 else np.where(err2.numpy() > 0, np.inf, 0.0)
            spars[layer, e] = ssum.numpy() / x.shape[0]
    return ExpertTolerance(p_grid=grid, rel_error=rel, sparsity=spars, tokens=tokens, budget=float(budget),
                           type=type, rule=rule)


class RoutedTokens:
    """An observer that keeps, per (layer, expert), the x rows routed to it and their router weights, in order.

    Fed `moeprof.stats.Observation`s by a capture Engine (`Engine(sites, observers=[...])`), like an
    accumulator, but neither registered nor collected: a profile does not gather it and a store does not hold
    it (it keeps raw rows, up to `max_tokens_per_expert` per expert, not a fixed-size state). A routing
    observation gives the router weights of the layer's next x observation; a dense layer's are 1.
    """

    type = "x"  # the activation it observes

    def __init__(self, max_tokens_per_expert: int):
        self.max_tokens_per_expert = max_tokens_per_expert
        self._rows: dict[tuple[int, int], list[torch.Tensor]] = {}  # [n, H] chunks
        self._weights: dict[tuple[int, int], list[torch.Tensor]] = {}  # [n] chunks
        self._counts: dict[tuple[int, int], int] = {}
        self._routing: dict[int, torch.Tensor] = {}  # layer -> router weights [T, K] of the current forward

    def add(self, obs) -> None:
        """Keep the routed x rows of an activation observation; remember a routing observation's weights."""
        if obs.type is None:
            self._routing[obs.layer] = obs.weights.view(obs.num_tokens, -1)  # [T, K]
            return
        if obs.type != self.type:
            return
        token_idx, slot = obs.token_idx.cpu(), obs.slot.cpu()  # [N] each
        routing = self._routing.pop(obs.layer, None)
        weights = (torch.ones(token_idx.shape[0]) if routing is None else routing[token_idx, slot]).float()  # [N]
        ids = obs.expert_ids.cpu()  # [N]
        order = torch.argsort(ids, stable=True)  # rows grouped by expert, in their order within each expert
        experts, counts = torch.unique_consecutive(ids[order], return_counts=True)
        for e, rows in zip(experts.tolist(), torch.split(order, counts.tolist())):
            key = (obs.layer, e)
            room = self.max_tokens_per_expert - self._counts.get(key, 0)
            if room <= 0:
                continue
            rows = rows[:room]
            self._rows.setdefault(key, []).append(obs.vectors[rows.to(obs.vectors.device)].detach().float().cpu())
            self._weights.setdefault(key, []).append(weights[rows])
            self._counts[key] = self._counts.get(key, 0) + rows.numel()

    def counts(self, num_layers: int, num_experts: int) -> np.ndarray:
        """Return the tokens kept per (layer, expert) [L, E] (each capped at max_tokens_per_expert)."""
        out = np.zeros((num_layers, num_experts), dtype=np.int64)
        for (layer, e), n in self._counts.items():
            out[layer, e] = n
        return out

    def tokens(self, layer: int, expert: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (x [T, H], router weights [T]) kept for one expert, or (None, None) when it saw no tokens."""
        if (layer, expert) not in self._rows:
            return None, None
        return torch.cat(self._rows[(layer, expert)]), torch.cat(self._weights[(layer, expert)])


@torch.no_grad()
def routed_tokens_of_model(model: torch.nn.Module, sequences: torch.Tensor, *, max_tokens_per_expert: int = 2048,
                           batch_size: int = 8) -> tuple[list, RoutedTokens]:
    """Return (the model's sites, a `RoutedTokens` holding the x rows and router weights each expert received) from
    one dense forward of `sequences` [N, T], observed through `moeprof.capture.attach` (the model is restored)."""
    from moeprof.arch import adapter_for
    from moeprof.capture import Engine, attach

    sites = adapter_for(model).sites(model)
    routed = RoutedTokens(max_tokens_per_expert)
    device = next(model.parameters()).device
    with attach(model, Engine(sites, observers=[routed])):
        for start in range(0, sequences.shape[0], batch_size):
            model(input_ids=sequences[start:start + batch_size].to(device))
    return sites, routed


@torch.no_grad()
def expert_tolerance_of_model(model: torch.nn.Module, sequences: torch.Tensor, *, type: str = "i",
                              rule: str = "topp", p_grid: Sequence[float] | None = None, budget: float = 0.05,
                              max_tokens_per_expert: int = 2048, batch_size: int = 8) -> ExpertTolerance:
    """Return every expert's tolerance (`ExpertTolerance`, arrays [L, E, …]) measured on `sequences` [N, T].

    One dense forward, observed through `moeprof.capture.attach` (the model is restored on exit), collects
    the hidden states each expert receives (up to max_tokens_per_expert per expert, in order) and their router
    weights; then each expert runs alone on them at every grid p, through its site's Layout (its own weights
    and GLU). Dense models have one "expert" per layer (router weight 1).
    """
    sites, routed = routed_tokens_of_model(model, sequences, max_tokens_per_expert=max_tokens_per_expert,
                                           batch_size=batch_size)
    L, E = len(sites), max(s.num_experts for s in sites)

    def expert_error(layer: int, expert: int, x: torch.Tensor, w: torch.Tensor, grid):
        layout = sites[layer].layout
        return layout_expert_error(layout, expert, x.to(layout.device), grid, type=type, rule=rule,
                                   weights=w.to(layout.device))

    return _tolerance(routed.tokens, expert_error, L, E, p_grid, budget, type, rule)


def tolerance_split_damage(model, tokenizer, *, tokens: int, ps: Sequence[float], type: str = "i",
                           text: str = "mixed") -> list[dict]:
    """Return, per p, the NLL increase and realized sparsity of sparsifying the tolerant vs the sensitive half.

    Validates the per-expert tolerance estimate: in every layer, experts are split by their estimated relative
    output error at p (`expert_tolerance_of_model`) into the lower half ("tolerant") and the upper half
    ("sensitive"); each half alone is sparsified at p on held-out text of corpus `text`.
    """
    from moeprof import corpora
    from moeprof.capture import sparsify
    from moeprof.evaluate.perplexity import DenseReference, perplexity, sequences_from_file

    seq = sequences_from_file(tokenizer, corpora.text_file(text, "heldout"), seq_len=256, max_tokens=tokens)
    tol = expert_tolerance_of_model(model, seq, type=type)
    ref = DenseReference(model, seq, batch_size=8, keep_logprobs=False)
    dense_nll = float(np.log(ref.result.ppl))
    L, E = tol.tokens.shape
    rows = []
    for p in ps:
        j = int(np.argmin(np.abs(tol.p_grid - p)))
        order = np.argsort(tol.rel_error[:, :, j], axis=1)  # [L, E] most tolerant first
        row = {"p": float(tol.p_grid[j])}
        for name, chosen in (("tolerant", order[:, : E // 2]), ("sensitive", order[:, E // 2:])):
            table = torch.full((L, E), float("nan"))
            for layer in range(L):
                table[layer, chosen[layer]] = float(tol.p_grid[j])
            with sparsify(model, type=type, p=table) as realized:
                res = perplexity(model, reference=ref)
            row[name] = {"delta_nll": float(np.log(res.ppl)) - dense_nll,
                         "sparsity": realized.token_weighted, "vectors": int(realized.tokens.sum())}
        rows.append(row)
    return rows
