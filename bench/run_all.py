"""``make bench``: every benchmark in one go, and ``bench/RESULTS.md`` from that run.

python bench/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from common import versions

HERE = Path(__file__).resolve().parent
BENCHES = [
    ("place_order.py", []),
    ("aggregate.py", []),
    ("list.py", []),
    ("pagination.py", []),
    ("relay.py", []),
    ("writers.py", []),
    ("peers.py", []),
]
QUICK = {
    "place_order.py": ["--transactions", "500", "--rounds", "1"],
    "aggregate.py": ["--operations", "500", "--rounds", "1", "--orders", "500"],
    "list.py": ["--requests", "300", "--rounds", "1", "--orders", "2000"],
    "pagination.py": ["--rows", "50000", "--depth", "1000", "--repeat", "5"],
    "relay.py": [
        "--backlog",
        "5000",
        "--seconds",
        "2",
        "--claim-backlog",
        "100000",
        "--wait-backlog",
        "20000",
        "--window",
        "3",
        "--wait-relays",
        "1,2",
    ],
    "writers.py": ["--seconds", "3", "--rounds", "1"],
    "peers.py": ["--rows", "200", "--rounds", "3"],
}


def markdown(table: dict[str, object]) -> str:
    columns = list(table["columns"])  # type: ignore[call-overload]
    lines = [f"### {table['title']}", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in table["rows"]:  # type: ignore[attr-defined]
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small runs (smoke test)")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for script, extra in BENCHES:
            out = Path(tmp) / f"{script}.json"
            command = [sys.executable, str(HERE / script), "--json", str(out), *extra]
            if args.quick:
                command += QUICK[script]
            print(f"== {script}", flush=True)
            subprocess.run(command, check=True)
            sections.append(markdown(json.loads(out.read_text())))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        "# Benchmark results\n\n"
        f"Measured by `make bench` in one run on {stamp}: {versions()}; PostgreSQL and NATS "
        "on the same machine. Ratios compare implementations measured in the same run "
        "(best round of each). Scripts and what they measure: `bench/*.py`.\n"
    )
    Path(args.output).write_text(header + "\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
