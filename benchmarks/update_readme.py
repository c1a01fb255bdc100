"""Copy result tables into README.md: every block between `<!-- results:NAME -->` and `<!-- /results:NAME -->`
is replaced by benchmarks/results/NAME.md (which a benchmark script generated from its JSON).

    python benchmarks/update_readme.py          # rewrite README.md
    python benchmarks/update_readme.py --check  # exit 1 if README is out of date (used by the tests)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def render(readme: str) -> str:
    def fill(m: re.Match) -> str:
        src = RESULTS / f"{m.group('name')}.md"
        if not src.is_file():
            raise FileNotFoundError(f"README block {m.group('name')!r} has no {src.relative_to(ROOT)}")
        return m.group(1) + src.read_text().rstrip() + "\n" + m.group(4)

    return BLOCK.sub(fill, readme)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md result blocks are out of date: run python benchmarks/update_readme.py")
            return 1
        return 0
    path.write_text(new)
    print(f"updated {len(BLOCK.findall(old))} result blocks in README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
