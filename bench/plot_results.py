"""The forward-time plot (ms against T) from results tables that bench.py wrote, merged:
for numbers measured in several device calls (one call may not hold the whole benchmark).

    python bench/plot_results.py bench/results/NVIDIA_H100_80GB_HBM3.md --out X.png

Reads every markdown table whose header starts with `| variant |`; a cell left empty is
no value. Of the rows of one variant and shape the first wins (a results file lists its
newest run first). Needs matplotlib.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import plot_rows  # noqa: E402


def read_rows(text: str) -> list[dict]:
    """The rows of the results tables in `text`: numbers as int or float, text as is."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == "variant":
            header = cells
        elif header and not set(line) <= set("|-: "):
            row = {}
            for name, cell in zip(header, cells):
                if cell:
                    try:
                        row[name] = int(cell)
                    except ValueError:
                        try:
                            row[name] = float(cell)
                        except ValueError:
                            row[name] = cell
            rows.append(row)
    return rows


def merged(rows: list[dict]) -> list[dict]:
    by_key = {}
    for row in rows:
        by_key.setdefault((row.get("variant"), row.get("B"), row.get("T"), row.get("D")), row)
    return list(by_key.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="+", help="results .md files")
    parser.add_argument("--out", required=True, help="the .png to write")
    parser.add_argument("--title", default="attnc forward, bf16, H=16")
    args = parser.parse_args(argv)
    rows = merged([r for path in args.tables for r in read_rows(Path(path).read_text())])
    rows = [r for r in rows if "variant" in r and "T" in r and "D" in r]
    if not rows:
        parser.error("no results rows in " + ", ".join(args.tables))
    if not plot_rows(rows, args.out, args.title):
        print("plot_results.py needs matplotlib", file=sys.stderr)
        return 2
    print(f"wrote {args.out} from {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
