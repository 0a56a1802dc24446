"""One rank of a data-parallel profile whose rank 1 fails (run by test_scaleout as 2 processes).

argv: OUT DATA MODE, MODE "raise" (rank 1 raises in its forward: it reports, the others stop) or "die"
(rank 1 exits without a word: the others time out). Rank 0 prints the error line and exits 2, like the CLI.
"""

import os
import sys

from moeprof.distributed import DistributedError, Ranks
from moeprof.models import load_model
from moeprof.profile import profile

out, data, mode = sys.argv[1:4]
ranks = Ranks.from_env("cpu", timeout_s=8)
model, tokenizer = load_model("tiny-moe")
if ranks.rank == 1:
    def fail(module, args):
        if mode == "die":
            os._exit(3)
        raise RuntimeError("injected failure on rank 1")

    model.model.layers[1].register_forward_pre_hook(fail)
try:
    profile(model, tokenizer, [data], out, model_id="tiny-moe", max_tokens=512, seq_len=64, batch_size=2,
            show_progress=False, ranks=ranks)
except DistributedError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
finally:
    ranks.close()
