"""Write a benchmark's result into its own section of BENCHMARKS.md, between markers, so reruns
replace the old figures instead of piling up."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    import os
    return f"{gpu + ', ' if gpu else ''}{os.cpu_count()} cores of {cpu}, Python {platform.python_version()}"


def command() -> str:
    return "python " + " ".join([sys.argv[0].split("/work/main/")[-1]] + sys.argv[1:])


def record(section: str, title: str, body: str) -> None:
    """Replace (or append) the section called `section` with a header, the date, machine, command
    and `body` (markdown)."""
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = (f"{start}\n## {title}\n\n{date.today().isoformat()} · {machine()}\n\n"
             f"`{command()}`\n\n{body.strip()}\n{end}")
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nEvery figure carries its date, machine and command.\n"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)
