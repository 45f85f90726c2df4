"""The markdown table every benchmark prints: a header, its rows, and the command that produced each row.

    from tables import print_table   # benchmarks/ is on sys.path when a script in it runs
    print_table(["method", "ppl"], [["rtn", "63.10"]], commands=["hiq fit --config configs/tiny/rtn-w2.yaml"])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """``header`` and ``rows`` (cells already formatted, or anything ``str`` takes) as a markdown table; every row
    must have the header's width."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"table row {i} has {len(row)} cells, the header {len(header)}: {list(row)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]], commands: Iterable[str] = (),
                title: str | None = None) -> None:
    """Print ``title`` (between blank lines), the table, then one ``- `command` `` line per entry of ``commands``
    after a blank line (an entry that already holds backticks is printed as it is)."""
    if title is not None:
        print(f"\n{title}\n")
    print(markdown_table(header, rows))
    commands = list(commands)
    if commands:
        print()
        for c in commands:
            print(f"- {c}" if "`" in c else f"- `{c}`")
