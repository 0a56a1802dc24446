"""The versioned HDF5 store: its schema table (`schema`), the profile writer (`writer`), the typed records
(`records`) and the reader (`reader`), the results other commands add and the export (`results`).

Layout (L = layers, E = experts per layer — 1 for dense models, P = p-grid size, B = histogram bins, A = |entry|
histogram bins, N = traced tokens, K = routed slots). `schema_table()` lists every dataset with its dims, dtype, doc
and units; the writer takes each dataset's `doc` / `units` attributes from it.

    /                      attrs: format="moeprof-profile", schema_version, model, model_type, architecture,
                                  is_moe, num_layers, num_experts, top_k, hidden_size, model_config (JSON),
                                  data_sources (JSON), tokens, seq_len, batch_size, dtype, device, types (JSON),
                                  moeprof_version, created_utc, wall_s, parameters (JSON: total, active)
    /p_grid                [P]        the top-p values profiled
    /hist_edges            [B+1]      per-vector sparsity histogram bin edges
    /sites/intermediate_size [L]      FFN width per expert of each layer
    /sites/kind            [L]        "routed" | "shared" | "dense" ("moe" in stores written before: = routed)
    /<accumulator group>/… one group per registered statistic (`moeprof.stats.STATISTICS`), written by its
                           `to_hdf5` (exact state, merged by its reductions) plus the derived means readers use:
      /routing/{tokens, weight_sum, layer_tokens}
      /sparsity/<t>/{vectors, width, sum, sqsum, hist} state; {mean, std} derived     (t ∈ {x, u, g, i})
      /magnitude/<t>/{vectors, l1_sum, l2_sum, max_abs_sum, max_abs, peak_ratio_sum} state;
                     {l1_mean, l2_mean, max_abs_mean, peak_ratio_mean} derived
      /abs_hist/<t>/counts [L, E, A] state; edges [A-1] (the fixed log |entry| bins; what a static threshold τ
                     needs: `Store.abs_histogram`, `moeprof.schedule.thresholds`)
      /rank/<t>/{vectors, gram} state; effective_rank [L, E] derived; attrs method, layers  (with --rank)
      /trace/…             optional per-token detail (token_id, sequence, position, expert, weight, sparsity_<t>)
    /outliers/...          per-layer routing balance (load_share, entropy_norm, max_mean_load, dead) and
                           <t>/sparsity_z, <t>/flagged [L, E, P]: robust z of expert sparsity within its layer
    /critical/...          critical-sparsity results (`write_critical`, added by `moeprof critical`)
    /stability/...         mask stability (`write_stability`, written by `moeprof stability`)
    /schedules/<name>/p    [L, E] a per-expert p schedule (`write_schedule`); attr `schedule` = the rest of its
                           JSON form (`moeprof.schedule.Schedule`), read back by `Store.schedule(name)`

Every dataset carries `doc` and `units` attributes. A store is written under a temporary name and renamed, so a
crash or Ctrl-C never leaves a half-written file under the real name.

Versions. Schema 2 added the exact accumulator state (sparsity/<t>/{sum, sqsum}, magnitude/<t>/{vectors, *_sum})
and the trace's stream counters (attrs max_tokens, tokens_seen, sequences_seen); every schema-1 dataset keeps its
name and meaning. Readers accept both. A schema-1 store reads the same through every typed reader; rebuilding its
statistics (`ProfileStats.from_store`) reconstructs the sums from mean × vectors and the squared sums from
(std² + mean²) × vectors, equal to the originals up to floating-point rounding, not bit for bit.
"""

from moeprof.store.reader import Store, is_store, open_store
from moeprof.store.records import (AbsHist, Balance, Critical, Magnitude, Outliers, ProfileMeta, Routing, Sites,
                                   Sparsity, Trace)
from moeprof.store.results import check_schedule_name, export_table, write_critical, write_schedule, write_stability
from moeprof.store.schema import (BALANCE_DATASETS, CRITICAL_DOC, DIM_LABELS, FORMAT, KEPT_GROUPS, SCHEMA_VERSION,
                                  STABILITY_DOC, STORE_FIELDS, STORED_SITE_KINDS, StoreError, canonical_site_kinds,
                                  config_fingerprint, critical_key, doc_units, label_dims, member_path, schema_table)
from moeprof.store.writer import (check_output, check_replace, check_store_space, estimate_bytes, update_store,
                                  write_profile)
from moeprof.atomic import check_writable  # the output-path rule every writer applies (kept importable from here)

__all__ = ["AbsHist", "BALANCE_DATASETS", "Balance", "CRITICAL_DOC", "Critical", "DIM_LABELS", "FORMAT", "KEPT_GROUPS",
           "Magnitude", "Outliers", "ProfileMeta", "Routing", "SCHEMA_VERSION", "STABILITY_DOC", "STORED_SITE_KINDS",
           "STORE_FIELDS", "Sites", "Sparsity", "Store", "StoreError", "Trace", "canonical_site_kinds",
           "check_output", "check_replace", "check_schedule_name", "check_store_space", "check_writable",
           "config_fingerprint",
           "critical_key", "doc_units", "estimate_bytes", "export_table", "is_store", "label_dims", "member_path",
           "open_store", "schema_table", "update_store", "write_critical", "write_profile", "write_schedule",
           "write_stability"]
