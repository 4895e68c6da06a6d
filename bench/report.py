"""What every bench does at its end: print its markdown report and append it to the file named by ``--out``."""

from __future__ import annotations

from pathlib import Path


def publish(report: str, out: Path | None) -> None:
    print(report)
    if out is not None:
        with out.open("a") as f:
            f.write(report + "\n")
