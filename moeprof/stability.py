"""Mask stability: how much an expert's top-p kept-set changes from one generation step to the next.

Legend: L = layers, E = experts per layer (1 for a dense FFN), G = largest step gap recorded, D = vector width.

For one generated sequence, step s is the decode forward that processes position P − 1 + s (P = prompt length;
step 0 is the prompt's last position, which yields the first new token). At each step and layer, each expert
that serves the token has a top-p mask m ∈ {0,1}^D of the chosen activation type. Then, per (layer, expert):
- consecutive: Jaccard |m_s ∧ m_{s+1}| / |m_s ∨ m_{s+1}| over the pairs of steps s, s + 1 that the expert
  both serves (for an MoE: the same expert serves token t and token t + 1);
- drift: Jaccard between the mask of the first step the expert serves and of each later step it serves;
- per layer, the same-expert Jaccard against the step gap g = 1..G (consecutive is g = 1) and the drift
  against the distance from the expert's first step.
Two empty masks have Jaccard 1 (identical kept-sets). Means over pairs; NaN where there is no pair.

`StabilityStats` holds sums and pair counts (it merges by adding), `stability_run` generates with the model
under `moeprof.capture.attach` and feeds it through a `MaskRecorder` observer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from moeprof.topp import topp_mask


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return |a ∧ b| / |a ∨ b| of bool masks over the last dim [..., D] -> [...] (1 where both are empty)."""
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass
class StabilityStats:
    """Sums and pair counts of same-expert Jaccards: consecutive and drift [L, E], by gap [L, G] (gap g at g-1)."""

    consecutive_sum: torch.Tensor  # [L, E] float64
    consecutive_pairs: torch.Tensor  # [L, E] int64
    drift_sum: torch.Tensor  # [L, E] float64
    drift_pairs: torch.Tensor  # [L, E] int64
    gap_sum: torch.Tensor  # [L, G] float64
    gap_pairs: torch.Tensor  # [L, G] int64
    drift_gap_sum: torch.Tensor  # [L, G] float64
    drift_gap_pairs: torch.Tensor  # [L, G] int64

    @classmethod
    def empty(cls, num_layers: int, num_experts: int, max_gap: int) -> "StabilityStats":
        L, E, G = num_layers, num_experts, max_gap
        f, i = (lambda *s: torch.zeros(*s, dtype=torch.float64)), (lambda *s: torch.zeros(*s, dtype=torch.long))
        return cls(f(L, E), i(L, E), f(L, E), i(L, E), f(L, G), i(L, G), f(L, G), i(L, G))

    def add_sequence(self, layer: int, steps: Sequence[dict[int, torch.Tensor]]) -> None:
        """Add one sequence's masks at `layer`: steps[s] = {expert: bool mask [D]} of the experts serving step s."""
        G = self.gap_sum.shape[1]
        first: dict[int, tuple[int, torch.Tensor]] = {}
        for s, masks in enumerate(steps):
            for e, m in masks.items():
                if e not in first:
                    first[e] = (s, m)
                    continue
                s0, m0 = first[e]
                j = float(jaccard(m0, m))
                self.drift_sum[layer, e] += j
                self.drift_pairs[layer, e] += 1
                if s - s0 <= G:
                    self.drift_gap_sum[layer, s - s0 - 1] += j
                    self.drift_gap_pairs[layer, s - s0 - 1] += 1
            for g in range(1, G + 1):
                if s - g < 0:
                    break
                for e in masks.keys() & steps[s - g].keys():
                    j = float(jaccard(steps[s - g][e], masks[e]))
                    self.gap_sum[layer, g - 1] += j
                    self.gap_pairs[layer, g - 1] += 1
                    if g == 1:
                        self.consecutive_sum[layer, e] += j
                        self.consecutive_pairs[layer, e] += 1

    def merge(self, other: "StabilityStats") -> "StabilityStats":
        """Return the statistics of both sets of sequences (sums and counts add)."""
        return StabilityStats(*(getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__))

    @staticmethod
    def _mean(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))

    def arrays(self) -> dict[str, torch.Tensor]:
        """Return the means (NaN: no pair) and the pair counts, by their store names."""
        return {"consecutive_jaccard": self._mean(self.consecutive_sum, self.consecutive_pairs),
                "consecutive_pairs": self.consecutive_pairs,
                "drift_jaccard": self._mean(self.drift_sum, self.drift_pairs), "drift_pairs": self.drift_pairs,
                "gap_jaccard": self._mean(self.gap_sum, self.gap_pairs), "gap_pairs": self.gap_pairs,
                "drift_gap_jaccard": self._mean(self.drift_gap_sum, self.drift_gap_pairs),
                "drift_gap_pairs": self.drift_gap_pairs}


class MaskRecorder:
    """A capture observer keeping the top-p mask of `type` per (layer, position, expert) of one sequence.

    Positions come from the forward calls in order: a routing observation of a layer opens that layer's next
    forward (its T tokens continue the positions of the previous one), so a prefill of P tokens and then one
    token per decode step give positions 0..P-1, P, P+1, ... (batch size 1).
    """

    def __init__(self, type: str, p: float):
        self.type, self.p = type, p
        self.masks: dict[int, dict[int, dict[int, torch.Tensor]]] = {}  # layer -> position -> expert -> [D]
        self._next: dict[int, int] = {}  # layer -> first position of its next forward
        self._start: dict[int, int] = {}  # layer -> first position of its current forward

    def add(self, obs) -> None:
        if obs.type is None:
            self._start[obs.layer] = self._next.get(obs.layer, 0)
            self._next[obs.layer] = self._start[obs.layer] + obs.num_tokens
            return
        if obs.type != self.type:
            return
        masks = topp_mask(obs.vectors.float(), self.p).cpu()  # [N, D]
        pos = (obs.token_idx.cpu() + self._start.get(obs.layer, 0)).tolist()
        layer = self.masks.setdefault(obs.layer, {})
        for n, (t, e) in enumerate(zip(pos, obs.expert_ids.cpu().tolist())):
            layer.setdefault(t, {})[e] = masks[n]

    def steps(self, layer: int, first: int, count: int) -> list[dict[int, torch.Tensor]]:
        """Return the masks of positions first .. first + count - 1 at `layer` (one dict per step)."""
        at = self.masks.get(layer, {})
        return [at.get(first + s, {}) for s in range(count)]


# ----------------------------------------------------------------------------------------------------------
# Generating under capture


def read_prompts(path) -> list[str]:
    """Return the prompts of a text file (one per non-empty line) or JSONL (key "prompt" or "text")."""
    import json
    from pathlib import Path

    from moeprof.usage import UsageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompt file {path} does not exist; give a text file with one prompt per line")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):
                raise UsageError(f"line {n} of {path} is not a JSON object; write one {{\"prompt\": ...}} per line "
                                 "(or use a .txt file, one prompt per line)")
            line = str(rec.get("prompt", rec.get("text", ""))).strip()
        if line:
            prompts.append(line)
    if not prompts:
        raise UsageError(f"prompt file {path} holds no prompt; write one prompt per line")
    return prompts


def stability_run(model, tokenizer, prompts: Sequence[str], out, *, model_id: str, p: float = 0.9,
                  type: str = "i", max_new_tokens: int = 32, max_gap: int = 8, show_progress: bool = True):
    """Generate greedily from each prompt under capture, write a store of that run's profile plus /stability
    (the Jaccard statistics of `type`'s top-p masks, see the module doc) to `out`; return the StabilityStats."""
    import time

    from moeprof.arch import adapter_for, text_config
    from moeprof.capture import Engine, attach
    from moeprof.profile import check_types, progress_bar
    from moeprof.stats import ProfileStats
    from moeprof.store import ProfileMeta, check_replace, check_writable, write_profile, write_stability
    from moeprof.topp import DEFAULT_P_GRID, check_p_grid
    from moeprof.usage import UsageError

    check_writable(out)
    if not prompts:
        raise UsageError("no prompt given; write one prompt per line in the --prompts file")
    if not 0 < p <= 1:
        raise UsageError(f"--p {p} must lie in (0, 1]")
    (type,) = check_types([type])
    if max_new_tokens < 2:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no pair of decode steps to compare; give at "
                         "least 2")
    config = text_config(model.config)
    limit = getattr(config, "max_position_embeddings", None)
    encoded = [tokenizer(t, return_tensors="pt").input_ids for t in prompts]
    for text, ids in zip(prompts, encoded):
        if ids.shape[1] == 0:
            raise UsageError(f"prompt {text[:40]!r} encodes to no token; remove it from the prompt file")
        if limit is not None and ids.shape[1] + max_new_tokens > limit:
            raise UsageError(f"a prompt of {ids.shape[1]} tokens leaves no room for {max_new_tokens} new tokens "
                             f"(the model takes {limit} positions); shorten it or lower --max-new-tokens")
    sites = adapter_for(model).sites(model)
    L, E = len(sites), max(s.num_experts for s in sites)
    check_replace(out, L, E)  # a store whose /critical or /schedules would not fit: refused before generating
    grid = check_p_grid(sorted(set(DEFAULT_P_GRID) | {float(p)}))
    stats = ProfileStats(L, E, grid, (type,))
    result = StabilityStats.empty(L, E, max_gap)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = Engine(sites, stats=stats, observers=[MaskRecorder(type, p)])
    tokens, steps_total = 0, 0
    start = time.perf_counter()
    with progress_bar() as bar, attach(model, engine), torch.inference_mode():
        task = bar.add_task(f"generating ({model_id})", total=len(prompts) * max_new_tokens, visible=show_progress)
        for ids in encoded:
            recorder = MaskRecorder(type, p)
            engine.observers = [recorder]
            P = ids.shape[1]
            gen = model.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad)
            steps = gen.shape[1] - P  # decode steps: positions P-1 .. P+steps-2 were computed
            for layer in range(L):
                result.add_sequence(layer, recorder.steps(layer, P - 1, steps))
            tokens += P + steps - 1
            steps_total += steps
            bar.update(task, advance=max_new_tokens)
    first = next(model.parameters())
    meta = ProfileMeta(
        model=model_id, model_type=str(config.model_type),
        architecture=",".join(getattr(model.config, "architectures", None) or [type_name(model)]),
        is_moe=any(s.is_routed for s in sites), top_k=max(s.top_k for s in sites),
        hidden_size=int(config.hidden_size), model_config=config.to_dict(), data_sources=["generation"],
        tokens=tokens, seq_len=0, batch_size=1, dtype=str(first.dtype).replace("torch.", ""),
        device=str(first.device), wall_s=time.perf_counter() - start)
    write_profile(out, stats, meta, intermediate_sizes=[s.intermediate_size for s in sites],
                  site_kinds=["routed" if s.is_routed else s.kind for s in sites], site_layers=[s.layer for s in sites])
    attrs = {"mode": "autoregressive", "p": float(p), "type": type, "prompts": len(prompts),
             "max_new_tokens": int(max_new_tokens), "decode_steps": int(steps_total), "max_gap": int(max_gap)}
    write_stability(out, attrs, {k: v.numpy() for k, v in result.arrays().items()})
    return result


def type_name(model) -> str:
    return model.__class__.__name__
