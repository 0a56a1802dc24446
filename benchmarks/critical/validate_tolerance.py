"""Does the per-expert tolerance estimate predict real damage? (issue 4 (b), on the embedded tiny MoE)

For each p, every layer's experts are split by their estimated relative output error at that p
(`moeprof.critical.expert_tolerance_of_model`): the half with the lowest error ("tolerant") and the other half
("sensitive"). Each half is sparsified alone (top-p on i) and the held-out NLL increase is measured.

    .venv/bin/python benchmarks/critical/validate_tolerance.py [--model tiny-moe] [--tokens 4096] [--p 0.5 0.7]
"""

from __future__ import annotations

import argparse
import json

from moeprof.critical import tolerance_split_damage
from moeprof.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--p", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    args = parser.parse_args()
    model, tok = load_model(args.model)
    for row in tolerance_split_damage(model, tok, tokens=args.tokens, ps=args.p):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
