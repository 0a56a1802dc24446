"""The critical-sparsity API: resolve a task, search, measure each expert's tolerance, write into a store.

    run = run_critical(model, tokenizer, type="i", task="ppl:wikipedia")   # CriticalRun(result, tolerance)
    ensure_store(model, tokenizer, "out.h5", model_name="smollm2", type="i")
    write("out.h5", run)                                                  # the store's /critical group

Tasks (what a task string names, its evaluator) are `moeprof.evaluate.task`'s; the store's schema is in
`moeprof.store` (`critical_record` builds its record).
This module imports neither transformers nor h5py until a function needs them.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from moeprof.activation_types import ACTIVATION_TYPES
from moeprof.critical.search import DEFAULT_TARGET, CriticalResult, kept_warnings
from moeprof.data import DataShortWarning
from moeprof.evaluate.point import EvalPoint
from moeprof.evaluate.task import resolve_task, task_evaluator

if TYPE_CHECKING:  # torch: imported when a search runs, so that a bad argument is refused in well under a second
    from moeprof.critical.tolerance import ExpertTolerance
    from moeprof.evaluate.journal import EvaluationJournal

TOLERANCE_BUDGET = 0.05  # relative output error an expert alone may inject (see ExpertTolerance)
TOLERANCE_MAX_TOKENS = 8192  # held-out tokens the tolerance is measured on (at most)


def check_request(*, type: str, target: float, task: str) -> Task:
    """Return the resolved task after checking arguments that can never work (before any model is loaded)."""
    from moeprof.errors import UsageError

    resolved = resolve_task(task)
    if type not in ACTIVATION_TYPES:
        raise UsageError(f"--type {type!r} is not an activation type; choose one of {', '.join(ACTIVATION_TYPES)}")
    if not 0.0 < target <= 1.0:
        raise UsageError(f"--target must lie in (0, 1] (a fraction of the dense score, e.g. 0.99), got {target}")
    return resolved


def critical_sparsity(model, tokenizer, *, type: str, task: str, rule: str = "topp", target: float = DEFAULT_TARGET,
                      limit: int | None = None, batch_size: int = 8, seq_len: int = 512, max_tokens: int = 32768,
                      proxies: bool = False, metric: str | None = None, journal: EvaluationJournal | None = None,
                      **search) -> CriticalResult:
    """Return the CriticalResult of `model` for activation `type` on `task` (`moeprof.evaluate.task`).

    `limit`: documents per lm-eval evaluation, or packed sequences for perplexity. `search` goes to
    `find_critical` (tol, p_min, check, on_point, …). `journal`: every evaluation is journaled as it completes
    and taken from it when it holds that p (`moeprof.evaluate.journal`: an interrupted search resumes).
    """
    from moeprof.critical.search import find_critical

    ev = task_evaluator(model, tokenizer, task, type=type, rule=rule, limit=limit, batch_size=batch_size,
                        seq_len=seq_len, max_tokens=max_tokens, proxies=proxies, metric=metric)
    resolved, evaluate, chance = ev.task, ev.evaluate, ev.chance
    if journal is not None:
        evaluate = journal.wrap(evaluate)
    search.setdefault("extend", True)  # continue below p_min toward 0 until a point fails
    result = find_critical(evaluate, target=target, rule=rule, chance=chance, type=type, task=resolved.name,
                           **search)
    examples = None if result.dense.example_values is None else int(np.size(result.dense.example_values))
    result.settings = {"limit": limit, "examples": examples}
    if resolved.is_perplexity:
        result.settings.update(seq_len=seq_len, max_tokens=max_tokens, tokens=ev.tokens)
    return result


@dataclass
class CriticalRun:
    """What `run_critical` found: the search's result and each expert's own tolerance (None if not measured)."""

    result: CriticalResult
    tolerance: ExpertTolerance | None = None


def run_critical(model, tokenizer, *, type: str, task: str, target: float = DEFAULT_TARGET, rule: str = "topp",
                 limit: int | None = None, batch_size: int = 8, seq_len: int = 256, max_tokens: int = 8192,
                 check: bool = False, tolerance_budget: float | None = TOLERANCE_BUDGET,
                 tolerance_text: str = "wikipedia", on_point: Callable[[EvalPoint], None] | None = None,
                 on_warning: Callable[[str], None] | None = None,
                 log: Callable[[str], None] | None = None, journal: EvaluationJournal | None = None) -> CriticalRun:
    """Return the CriticalRun of `model`: the critical-sparsity search of `type` on `task`, then each expert's
    tolerance within `tolerance_budget` (None: skip it).

    The tolerance is measured on the task's own text for ppl:FILE, else on corpus `tolerance_text`'s held-out
    split (at most 8,192 tokens: no model forward per p, so it is cheap). `check=True` spends the search's one
    monotonicity check; `on_point(point)` is called after each evaluation, and `log(line)` gets one plain line
    per evaluation (k/N, p, score, ratio, realized sparsity, elapsed: `evaluation_log`) and per stage. The run's
    warnings (chance-level score, too few examples, non-monotone curve, less text than `max_tokens`) are kept in
    `result.warnings` (the store keeps them) and go to `on_warning(message)` when given (one per warning, e.g. a
    CLI's yellow line), else through `warnings` as usual. `journal` (`search_journal`): each evaluation is
    journaled as it completes and reused from it when present, so an interrupted search resumes where it stopped.
    """
    from moeprof import corpora
    from moeprof.critical.search import max_evaluations
    from moeprof.critical.tolerance import expert_tolerance_of_model
    from moeprof.evaluate.perplexity import sequences_from_file

    if log is not None:
        on_point = evaluation_log(log, n=max_evaluations(check=check, extend=True), target=target, also=on_point)
    kept: list[str] = []
    with kept_warnings(kept, on_warning):
        result = critical_sparsity(model, tokenizer, type=type, task=task, rule=rule, target=target,
                                   limit=limit, batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens,
                                   check=check, on_point=on_point, journal=journal)
    result.warnings = kept
    if tolerance_budget is None:
        return CriticalRun(result)
    resolved = resolve_task(task)
    own_text = resolved.is_perplexity and resolved.text not in corpora.NAMES
    path = resolved.text_file() if own_text else corpora.text_file(tolerance_text, "heldout")
    if log is not None:
        log(f"measuring each expert's own tolerance of {type} (budget {tolerance_budget:.0%} relative output "
            f"error) on {path.name} ...")
    start = time.perf_counter()
    kept = []
    with kept_warnings(kept, on_warning):
        # (the tolerance takes *at most* TOLERANCE_MAX_TOKENS by design: less text than that is no news)
        warnings.simplefilter("ignore", DataShortWarning)
        sequences = sequences_from_file(tokenizer, path, seq_len=seq_len,
                                        max_tokens=min(max_tokens, TOLERANCE_MAX_TOKENS))
        tolerance = expert_tolerance_of_model(model, sequences, type=type, rule=rule, budget=tolerance_budget)
    result.warnings += ["tolerance: " + m for m in kept]
    if log is not None:
        log(f"tolerance measured on {int(sequences.numel()):,} tokens in {time.perf_counter() - start:.1f} s")
    return CriticalRun(result, tolerance)


def search_journal(out: str | Path, model, model_name: str, *, type: str, task: str, rule: str = "topp",
                   limit: int | None = None, batch_size: int = 8, seq_len: int = 256,
                   max_tokens: int = 8192) -> EvaluationJournal:
    """Return the evaluation journal of a critical search into `out` (`OUT.journal`), keyed by everything that
    decides an evaluation's result: the model (id, config, weights, dtype, device), the task and how much of it
    is read, the activation type and the rule. The target is not in the key: the same evaluations serve any."""
    from moeprof.evaluate.journal import EvaluationJournal, journal_path, model_key
    from moeprof.models import model_id

    key = {"search": "critical", **model_key(model, model_id(model_name)), "type": type, "rule": rule,
           "task": resolve_task(task).name, "limit": limit, "batch_size": batch_size, "seq_len": seq_len,
           "max_tokens": max_tokens}
    return EvaluationJournal(journal_path(out), key)


def check_space_for_search(out: str | Path) -> None:
    """Raise DiskFullError (`moeprof.atomic`) before a search when the folder of the store `out` cannot hold what
    the search writes: the store rewritten with its /critical record beside the old one (then renamed onto it),
    and the journal. Both are bounded by the store's own size: a profile holds [L, E, P] and [L, E, P, B] arrays
    of every type, the record a few [L, E] arrays and the tolerance curves, the journal one [L, E] array per
    evaluation (as JSON text), so twice the store plus 1 MiB is enough."""
    from moeprof.atomic import check_space

    check_space(out, 2 * Path(out).stat().st_size + (1 << 20))


def evaluation_log(log: Callable[[str], None], *, n: int, target: float,
                   also: Callable[[EvalPoint], None] | None = None) -> Callable[[EvalPoint], None]:
    """Return an `on_point` callback that gives `log` one line per evaluation (`report.critical.evaluation_line`):
    k/N, p (or dense), score, ratio to dense and pass/fail, realized sparsity, seconds since the first call was
    made ready; `also(point)` is called too."""
    from moeprof.report.critical_tables import evaluation_line

    start = time.perf_counter()
    state = {"k": 0, "dense": None}

    def on_point(pt: EvalPoint) -> None:
        state["k"] += 1
        if pt.p is None:
            state["dense"] = pt.score
        dense = state["dense"]  # (None when a cached dense point was passed in: ratio NaN)
        ratio = pt.score / dense if dense else float("nan")
        log(evaluation_line(state["k"], n, "dense" if pt.p is None else f"p {pt.p:.4f}", score=pt.score,
                            ratio=ratio, passed=None if pt.p is None else ratio >= target - 1e-12,
                            sparsity_token=None if pt.p is None else pt.sparsity_token,
                            sparsity_flop=None if pt.p is None else pt.sparsity_flop,
                            elapsed_s=time.perf_counter() - start, kind=pt.score_kind))
        if also is not None:
            also(pt)

    return on_point


def critical_record(result: CriticalResult, tolerance: ExpertTolerance | None = None):
    """Return the store's `/critical` record (`moeprof.store.Critical`) of a result and optional tolerance.

    Scalars become attrs (None written as NaN / ""), the evaluated sparse points the record's `points`
    columns, the [L, E] arrays its per-expert fields.
    """
    from moeprof.store import Critical

    nan = float("nan")
    attrs = {
        "target": result.target, "rule": result.rule, "type": result.type or "", "task": result.task or "",
        "critical_p": result.critical_p, "critical_sparsity_token": result.critical_sparsity_token,
        "critical_sparsity_flop": result.critical_sparsity_flop, "dense_score": result.dense_score,
        "critical_score": result.critical_score, "critical_ratio": result.critical_ratio,
        "ratio_ci_low": nan if result.ratio_ci is None else result.ratio_ci[0],
        "ratio_ci_high": nan if result.ratio_ci is None else result.ratio_ci[1],
        "ci_level": result.ci_level, "failing_p": nan if result.failing_p is None else result.failing_p,
        "num_evaluations": result.num_evaluations, "monotone": result.monotone, "at_bound": result.at_bound,
        "tol": result.tol, "score_kind": result.dense.score_kind, "notes": "\n".join(result.notes),
        "warnings": "\n".join(result.warnings),
    }
    # what the evaluations ran on (--limit, --seq-len, --max-tokens, and how much that really was); absent = not set
    attrs.update({k: int(v) for k, v in result.settings.items() if v is not None})
    per_expert = result.per_expert_sparsity  # [L, E] or None
    record = Critical(attrs, per_expert_sparsity=None if per_expert is None else np.asarray(per_expert, np.float64),
                      points=result.points_table())
    if tolerance is not None:
        record.attrs["tolerance_budget"] = tolerance.budget
        record.tolerance_sparsity = tolerance.tolerance_sparsity
        record.tolerance_p = tolerance.tolerance_p
        record.tolerance_rel_error = tolerance.rel_error
        record.tolerance_p_grid = tolerance.p_grid
    return record


def critical_items(result: CriticalResult) -> tuple[dict, dict[str, tuple[np.ndarray, str, str]]]:
    """Return (attrs, {relative name: (array, doc, units)}) of the store's /critical record of `result`:
    `critical_record(result)`'s attrs and arrays, documented from the schema table."""
    from moeprof.store import Critical

    record = critical_record(result)
    return record.attrs, {k: (v, *Critical.doc_units(k)) for k, v in record.arrays().items()}


def write(store_path: str | Path, run: CriticalRun, *, identity: dict | None = None) -> None:
    """Write `run` as the store's /critical/<type>/<rule>/<task> record (atomically; other searches are kept;
    StoreError if the store lacks its type). `identity` (`store_identity`) is recorded in its attrs."""
    from moeprof.store import write_critical

    record = critical_record(run.result, run.tolerance)
    record.attrs.update(identity or {})
    write_critical(store_path, record)


def store_identity(model, model_name: str) -> dict:
    """Return {"model": id, "config_fingerprint": hash} of a loaded model, as a store records them."""
    from moeprof.arch import text_config
    from moeprof.models import model_id
    from moeprof.store import config_fingerprint

    return {"model": model_id(model_name), "config_fingerprint": config_fingerprint(text_config(model.config).to_dict())}


def check_identity(out: str | Path, model, model_name: str) -> None:
    """Raise UsageError (before any search) when the store `out` profiles another model than `model`."""
    from moeprof.store import config_fingerprint, open_store
    from moeprof.errors import UsageError

    mine = store_identity(model, model_name)
    with open_store(out) as st:
        theirs_id = st.model
        try:
            theirs_fp = config_fingerprint(json.loads(st.attrs.get("model_config") or "{}"))
        except ValueError:
            theirs_fp = None
    if theirs_id != mine["model"]:
        raise UsageError(f"{out} profiles {theirs_id!r}, not {mine['model']!r}; give the store of this model or "
                         "another --out")
    if theirs_fp != mine["config_fingerprint"]:
        raise UsageError(f"{out} profiles {theirs_id!r} with another config (fingerprint {theirs_fp} vs "
                         f"{mine['config_fingerprint']}: the checkpoint changed); profile it again or give another --out")


@dataclass
class StoredAnchor:
    """What a profile store gives the schedule optimizer (`moeprof schedule --from`, `stored_anchor`)."""

    p: float | None  # the uniform critical p of the matching /critical record (None: nothing usable)
    source: dict | None  # what it came from, for the schedule's provenance (`anchor_store`)
    note: str  # one line: what is taken from the store and what is not, and why


# Why the expert curves are never read from a /critical record (docs/schedules.md, `moeprof schedule --from`)
CURVES_NOT_STORED = ("the expert curves are measured on the calibration split, not read from the store: its "
                     "tolerance_rel_error is sqrt(err2 / the expert's own output energy) on the held-out text, "
                     "without the sparsity curves, token counts and output energies they need")


def stored_anchor(store: str | Path, *, type: str, rule: str, task: str, target: float,
                  identity: dict | None = None, limit: int | None = None) -> StoredAnchor:
    """Return the uniform critical p that the store's /critical record of the same type, rule, task and target
    holds, as the schedule optimizer's anchor (`OptimizeConfig(anchor_start=...)`), or p None with the reason.

    Not used (p None, `note` says why): no record of this type, rule and task (another task's critical p is
    another split's), another target, a record of another model or config than `identity` (`store_identity`),
    a search that reached no sparse p. `source` records the store, the record and the data the stored search
    ran on; `source["heldout_overlap"]` is True when that data is (or may hold) the held-out split the schedule
    is scored on (ppl:<corpus>: its held-out split; an lm-eval task searched on more documents than the
    schedule's calibration `limit`, default 100): the note then says the held-out score is not independent.
    """
    from moeprof import corpora
    from moeprof.store import critical_key, open_store

    resolved = resolve_task(task)
    name = resolved.name
    where = f"--from {store}"
    with open_store(store) as st:
        records = st.criticals()
        record = st.critical(type=type, rule=rule, task=name)
    if record is None:
        have = ", ".join(sorted({"/".join(str(r.attrs.get(k, "")) for k in ("type", "rule", "task"))
                                 for r in records}))
        why = (f"its /critical records ({have}) are not of type {type}, rule {rule}, task {name}" if records
               else "it holds no /critical record")
        return StoredAnchor(None, None, f"{where}: {why}: the uniform anchor is searched (`moeprof critical MODEL "
                                        f"--type {type} --task {task} --out {store}` saves it)")
    a = record.attrs
    if not abs(float(a.get("target", float("nan"))) - target) <= 1e-12:  # (a missing or NaN target: not used)
        return StoredAnchor(None, None, f"{where}: its /critical record of {type} on {name} is for target "
                                        f"{a.get('target')}, not {target}: not used; the uniform anchor is searched")
    for key in ("model", "config_fingerprint"):
        if identity and a.get(key) and identity.get(key) and a[key] != identity[key]:
            return StoredAnchor(None, None, f"{where}: its /critical record is of {key} {a[key]!r}, this model's "
                                            f"is {identity[key]!r}: not used; the uniform anchor is searched")
    p = float(a.get("critical_p", float("nan")))
    if not 0.0 <= p < 1.0:
        return StoredAnchor(None, None, f"{where}: its /critical record of {type} on {name} reached no sparse p "
                                        f"(critical p {p}): not used; the uniform anchor is searched")
    settings = {k: int(a[k]) for k in ("seq_len", "max_tokens", "tokens", "limit", "examples") if k in a}
    if resolved.is_perplexity and resolved.text in corpora.NAMES:
        data, overlap = f"{resolved.text}:heldout", True
    elif resolved.is_perplexity:
        data, overlap = f"{resolved.text}, its first {settings.get('tokens', '?')} tokens", None  # may reach the
        # second half of the file, which the schedule scores on, when the stored search read more than half
    else:
        n = limit or 100
        searched = settings.get("limit")
        data = f"{name} documents [0, {searched})" if searched else f"{name}, all documents"
        overlap = searched is None or searched > n
    source = {"store": str(store), "record": critical_key(type, rule, name), "task": name, "target": target,
              "critical_p": p, "critical_ratio": a.get("critical_ratio"),
              "critical_sparsity_flop": a.get("critical_sparsity_flop"), "num_evaluations": a.get("num_evaluations"),
              "search_data": data, "heldout_overlap": overlap, **settings}
    note = (f"{where}: anchor = its uniform critical p {p:.4f} of {type} on {name} (searched on {data} in "
            f"{a.get('num_evaluations')} evaluations), verified with one calibration evaluation")
    if overlap:
        note += "; that search saw the split this schedule is scored on, so the held-out score is not independent"
    return StoredAnchor(p, source, note)


def ensure_store(model, tokenizer, out: str | Path, *, model_name: str, type: str, max_tokens: int = 4096,
                 announce: Callable[[str], None] | None = None, replace: bool = False) -> bool:
    """Make sure `out` is a profile of this model holding `type`; return True when it had to profile first.

    A missing store is made by profiling `max_tokens` of held-out Wikipedia (so the leaderboard can put
    per-expert critical sparsity next to routing load); `announce(message)` is told before that starts. An
    existing store without `type`, or of another model (`check_identity`), raises UsageError naming the fix.
    With `replace`, an existing file that is not a store is replaced by the new profile (the CLI's --force).
    """
    from moeprof.store import open_store
    from moeprof.errors import UsageError

    from moeprof.store import is_store

    out = Path(out)
    if out.exists() and (is_store(out) or not replace):
        check_identity(out, model, model_name)
        with open_store(out) as st:
            if type not in st.types:
                raise UsageError(f"--type {type!r} was not profiled in {out} (it has {', '.join(st.types)}); "
                                 f"profile it with `moeprof profile ... --types {type}` or give another --out")
        return False
    from moeprof.models import model_id
    from moeprof.profile import profile

    if announce is not None:
        announce(f"{out} does not exist: profiling {model_name} on wikipedia:heldout first")
    profile(model, tokenizer, ["wikipedia:heldout"], out, model_id=model_id(model_name), max_tokens=max_tokens)
    return True
