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

Block diffusion (DiffusionGemma; /stability attr mode = "block_diffusion", same arrays): the model generates a
canvas of C tokens per block and refines it over denoising steps, each a forward of its denoiser over the whole
canvas. For a denoiser row, a "sequence" is one canvas position of one block and step s its s-th denoising
step: consecutive = the same expert serving that position at denoising steps s and s + 1, drift = against the
first step it served the position, gap = steps apart. The encoder (same weights, causal) encodes the prompt and
each finished block; its rows hold the autoregressive Jaccards over consecutive encoded positions.

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


@dataclass
class Forward:
    """One forward of one site row, as a MaskRecorder saw it."""

    clock: int  # its order among the forwards of every row (which ran first)
    start: int  # its first position: a row's positions continue across its forwards
    tokens: int
    masks: dict[int, dict[int, torch.Tensor]]  # token index in the forward -> expert -> bool mask [D]


class MaskRecorder:
    """A capture observer keeping the top-p mask of `type` per (row, forward, token, expert) of one sequence.

    A routing observation of a row opens that row's next forward (batch size 1). Autoregressive: its T tokens
    continue the positions of the previous forward, so a prefill of P tokens and then one token per decode step
    give positions 0..P-1, P, P+1, ... (`steps`). Block diffusion: each forward of a denoiser row is one
    denoising step over the canvas, its token index the canvas position (`forwards`).
    """

    def __init__(self, type: str, p: float):
        self.type, self.p = type, p
        self.forwards: dict[int, list[Forward]] = {}  # row -> its forwards in order
        self._clock = 0

    def add(self, obs) -> None:
        if obs.type is None:
            done = self.forwards.setdefault(obs.layer, [])
            start = done[-1].start + done[-1].tokens if done else 0
            done.append(Forward(self._clock, start, int(obs.num_tokens), {}))
            self._clock += 1
            return
        if obs.type != self.type:
            return
        current = self.forwards[obs.layer][-1]
        masks = topp_mask(obs.vectors.float(), self.p).cpu()  # [N, D]
        for n, (t, e) in enumerate(zip(obs.token_idx.cpu().tolist(), obs.expert_ids.cpu().tolist())):
            current.masks.setdefault(t, {})[e] = masks[n]

    def steps(self, layer: int, first: int, count: int) -> list[dict[int, torch.Tensor]]:
        """Return the masks of positions first .. first + count - 1 at `layer` (one dict per step)."""
        at = {fw.start + t: m for fw in self.forwards.get(layer, []) for t, m in fw.masks.items()}
        return [at.get(first + s, {}) for s in range(count)]


def denoising_sequences(forwards: Sequence[Forward], block_clocks: Sequence[int]) -> list[list[dict]]:
    """Return, per (block, canvas position), the masks of the denoising steps in order (one dict per step).

    forwards: a denoiser row's forwards (one per denoising step); block_clocks: the clocks of the forwards that
    open each block (the encoder's, which encodes the prompt or the block before): a step belongs to the last
    block opened before it.
    """
    import bisect

    blocks: dict[int, list[Forward]] = {}
    for fw in forwards:
        blocks.setdefault(bisect.bisect(block_clocks, fw.clock), []).append(fw)
    out = []
    for _, steps in sorted(blocks.items()):
        for t in range(max(fw.tokens for fw in steps)):
            out.append([fw.masks.get(t, {}) for fw in steps])
    return out


# ----------------------------------------------------------------------------------------------------------
# Generating under capture


def stability_run(model, tokenizer, prompts: Sequence[str], out, *, model_id: str, p: float = 0.9,
                  type: str = "i", max_new_tokens: int = 32, max_gap: int = 8, show_progress: bool = True,
                  denoising_steps: int | None = None, seed: int = 0):
    """Generate from each prompt under capture, write a store of that run's profile plus /stability (the
    Jaccard statistics of `type`'s top-p masks, see the module doc) to `out`; return the StabilityStats.

    A causal LM decodes greedily (mode "autoregressive"). A block-diffusion model (DiffusionGemma: sites in an
    "encoder" and a "denoiser" stack) generates with its own generation mixin (mode "block_diffusion", at most
    `denoising_steps` steps per block, its sampler seeded with `seed`): a denoiser row's Jaccards are between the
    denoising steps of each canvas position, an encoder row's between consecutive positions of the sequence it
    encodes (the prompt and each finished block), as autoregressive decoding of that sequence would give.
    """
    import time

    from moeprof.arch import adapter_for, text_config
    from moeprof.capture import Engine, attach
    from moeprof.profile import check_types, progress_bar
    from moeprof.stats import ProfileStats
    from moeprof.store import ProfileMeta, check_replace, check_writable, write_profile, write_stability
    from moeprof.topp import DEFAULT_P_GRID, check_p_grid
    from moeprof.errors import UsageError

    check_writable(out)
    if not prompts:
        raise UsageError("no prompt given; write one prompt per line in the --prompts file")
    if not 0 < p <= 1:
        raise UsageError(f"--p {p} must lie in (0, 1]")
    (type,) = check_types([type])
    if max_new_tokens < 2:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no pair of decode steps to compare; give at "
                         "least 2")
    if max_gap < 1:
        raise UsageError(f"--max-gap {max_gap} compares no pair of decode steps; give at least 1")
    config = text_config(model.config)
    sites = adapter_for(model).sites(model)
    diffusion = any(s.stack == "denoiser" for s in sites)
    canvas = int(model.config.canvas_length) if diffusion else 1
    new_tokens = -(-max_new_tokens // canvas) * canvas  # block diffusion generates whole canvases
    if denoising_steps is not None and (not diffusion or denoising_steps < 2):
        raise UsageError(f"--denoising-steps {denoising_steps} " + (
            "leaves no pair of denoising steps to compare; give at least 2" if diffusion else
            f"applies to block-diffusion models only ({config.model_type} decodes autoregressively); leave it out"))
    limit = getattr(config, "max_position_embeddings", None)
    encoded = [tokenizer(t, return_tensors="pt").input_ids for t in prompts]
    for text, ids in zip(prompts, encoded):
        if ids.shape[1] == 0:
            raise UsageError(f"prompt {text[:40]!r} encodes to no token; remove it from the prompt file")
        if limit is not None and ids.shape[1] + new_tokens > limit:
            raise UsageError(f"a prompt of {ids.shape[1]} tokens leaves no room for {new_tokens} new tokens "
                             f"(the model takes {limit} positions); shorten it or lower --max-new-tokens")
    L, E = len(sites), max(s.num_experts for s in sites)
    check_replace(out, L, E, model_id, config.to_dict())  # a store whose /critical or /schedules would not fit: refused before generating
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
            if diffusion:
                tokens_run, steps = _denoise(model, ids.to(device), sites, recorder, result, max_new_tokens,
                                             denoising_steps, seed)
                tokens += tokens_run
                steps_total += steps
                bar.update(task, advance=max_new_tokens)
                continue
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
    if meta.is_moe:
        from moeprof.arch.experts import router_facts

        meta.extra["router"] = router_facts(model, sites)
    write_profile(out, stats, meta, intermediate_sizes=[s.intermediate_size for s in sites],
                  site_kinds=[s.kind for s in sites],  # the store names routed "routed"
                  site_layers=[s.layer for s in sites])
    attrs = {"mode": "block_diffusion" if diffusion else "autoregressive", "p": float(p), "type": type,
             "prompts": len(prompts), "max_new_tokens": int(max_new_tokens), "max_gap": int(max_gap),
             "denoising_steps" if diffusion else "decode_steps": int(steps_total)}
    if diffusion:  # which rows hold which Jaccard (module doc)
        attrs.update(canvas_length=canvas, seed=int(seed),
                     denoiser_rows=[s.row for s in sites if s.stack == "denoiser"],
                     encoder_rows=[s.row for s in sites if s.stack == "encoder"])
    write_stability(out, attrs, {k: v.numpy() for k, v in result.arrays().items()})
    return result


def _denoise(model, ids, sites, recorder: MaskRecorder, result: StabilityStats, max_new_tokens: int,
             denoising_steps: int | None, seed: int) -> tuple[int, int]:
    """Generate from ids [1, P] with the model's own block-diffusion generation mixin, add its Jaccards to
    `result` (denoiser rows: across the denoising steps of each canvas position; encoder rows: across consecutive
    encoded positions); return (tokens run through the model, denoising steps)."""
    kwargs = {"max_new_tokens": max_new_tokens}
    if denoising_steps is not None:
        kwargs["max_denoising_steps"] = denoising_steps
    torch.manual_seed(seed)  # the sampler draws the canvas and its tokens
    model.generate(ids, **kwargs)
    encoder = [s.row for s in sites if s.stack == "encoder"]
    block_clocks = [fw.clock for fw in recorder.forwards.get(encoder[0], [])]
    for s in sites:
        forwards = recorder.forwards.get(s.row, [])
        if s.stack == "denoiser":
            for sequence in denoising_sequences(forwards, block_clocks):
                result.add_sequence(s.row, sequence)
        elif forwards:
            result.add_sequence(s.row, recorder.steps(s.row, 0, forwards[-1].start + forwards[-1].tokens))
    denoiser = next(s.row for s in sites if s.stack == "denoiser")
    steps = recorder.forwards.get(denoiser, [])
    encoded = recorder.forwards.get(encoder[0], [])
    return sum(fw.tokens for fw in steps + encoded), len(steps)


def type_name(model) -> str:
    return model.__class__.__name__
