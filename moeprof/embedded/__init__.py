"""moeprof's embedded models (one folder each: weights, tokenizer, metrics, card) and `train`, which made them."""
