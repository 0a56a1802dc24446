"""Names every layer of moeprof agrees on (no torch: readers of a store import this without loading models)."""

ACTIVATION_TYPES = ("x", "u", "g", "i")
TYPE_NAMES = {"x": "input", "u": "up", "g": "gate", "i": "intermediate"}
HIST_BINS = 20  # per-vector sparsity histogram over [0, 1]: bin b holds [b/B, (b+1)/B), the last bin includes 1
