r"""Compare the README's `make demo` excerpt with a run's report (issue 16, item 6).

  python scripts/check_readme.py                       # checkpoints/demo/report.md
  python scripts/check_readme.py --report=/tmp/run/report.md --atol=0.02

Every table of the README section "What `make demo` shows" must appear in the report with the
same header and rows, numbers equal to the printed digits (or within --atol). Exit status 1 and
the differences listed otherwise.

Figures that depend on floating-point rounding differ between CPU families (XLA emits other
vector code for AVX-512 than for AVX2 and the matrix kernels block by the caches, so sums round
differently; 1500 training steps carry that forward to another θ*, and near-tied ranks and greedy
decoding can flip). So the section may hold one set of tables per machine, each between
``<!-- figures: <machine> -->`` and ``<!-- /figures -->``: the report must match one set
entirely (the one it matches is named); when it matches none, the differences from the closest
set are listed. Tables outside such blocks are compared in every case.
"""

import argparse
import os
import re
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
    report = open(args.report, encoding="utf-8").read()
    name, problems = closest_figures(excerpt, report, args.atol)
    for p in problems:
        print(p)
    where = f" ({name})" if name else ""
    print(f"{'OK' if not problems else 'DIFFERENT'}: README's demo tables{where} vs {args.report} "
          f"({len(problems)} differences, atol={args.atol})")
    return 1 if problems else 0


BLOCK = re.compile(r"<!-- figures: (.+?) -->(.*?)<!-- /figures -->", re.S)


def closest_figures(excerpt: str, report: str, atol: float) -> tuple[str | None, list[str]]:
    """The README's figure block (machine name, differences) that ``report`` matches, else the
    one with the fewest differences; (None, differences) for a section without blocks. The
    tables outside the blocks count for each."""
    common = compare_tables(BLOCK.sub("", excerpt), report, atol)
    blocks = BLOCK.findall(excerpt)
    if not blocks:
        return None, common
    results = [(name.strip(), common + compare_tables(text, report, atol)) for name, text in blocks]
    return min(results, key=lambda r: len(r[1]))

if __name__ == "__main__":
    sys.exit(main())
