r"""Compare the README's `make demo` excerpt with a run's report (issue 16, item 6).

  python scripts/check_readme.py                       # checkpoints/demo/report.md
  python scripts/check_readme.py --report=/tmp/run/report.md --atol=0.02

Every table of the README section "What `make demo` shows" must appear in the report with the
same header and rows, numbers equal to the printed digits (or within --atol). Exit status 1 and
the differences listed otherwise. Figures that depend on floating-point rounding can differ
between CPU families (XLA emits other vector code for AVX-512 than for AVX2, so sums round
differently, 1500 training steps carry that forward, and greedy decoding and near-tied ranks
can flip): the README says which machine printed its figures.
"""

import argparse
import os
import sys

from jaxgrad.pipeline.report import compare_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## What `make demo` shows"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--report", default=os.path.join(ROOT, "checkpoints", "demo", "report.md"))
    parser.add_argument("--atol", type=float, default=0.0)
    args = parser.parse_args()
    text = open(args.readme, encoding="utf-8").read()
    if SECTION not in text:
        print(f"{args.readme}: no section {SECTION!r}", file=sys.stderr)
        return 2
    excerpt = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    if not os.path.isfile(args.report):
        print(f"{args.report} does not exist: run `make demo` first", file=sys.stderr)
        return 2
    problems = compare_tables(excerpt, open(args.report, encoding="utf-8").read(), args.atol)
    for p in problems:
        print(p)
    print(f"{'OK' if not problems else 'DIFFERENT'}: README's demo tables vs {args.report} "
          f"({len(problems)} differences, atol={args.atol})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
