"""Shared by the benchmark scripts: a description of the machine, a Markdown table writer, one results writer.

Every script writes ``bench/results/<name>.md`` (what people read) and ``bench/results/<name>.json`` (the same figures
with every raw measurement, for tools), each headed by the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: where results are written unless a script is told otherwise
RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """The machine and software a result was measured on: CPU model and cores, memory, GPU, versions, git commit."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    try:
        import steelkit

        info["steelkit"] = steelkit.__version__
    except ImportError:
        info["steelkit"] = None
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        info["git_commit"] = commit.stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def describe_machine(info: dict[str, Any]) -> str:
    """One line for the top of a results table."""
    gpu = info.get("gpu") or "no GPU"
    return (
        f"{info.get('cpu')}, {info.get('cpu_cores_available')} cores available, {info.get('memory_gib')} GiB, {gpu}; "
        f"Python {info.get('python')}, torch {info.get('torch')}, steelkit {info.get('steelkit')} "
        f"(commit {info.get('git_commit')}); {info.get('date')}"
    )


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], floatfmt: str = ".4f") -> str:
    """A GitHub Markdown table of ``rows`` (dicts) in the order of ``columns``; floats formatted with ``floatfmt``."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return format(value, floatfmt)
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    title: str,
    sections: Sequence[tuple[str, str]],
    data: dict[str, Any],
    out_dir: Path = RESULTS,
    info: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.md`` and ``<out_dir>/<name>.json``.

    Args:
        name: file stem.
        title: the Markdown page's heading.
        sections: ``(heading, markdown body)`` pairs, in order (tables from :func:`markdown_table`, notes).
        data: every figure, JSON-serialisable; the machine description and the command line are added.
        info: the machine (default: :func:`machine_info` now).

    Returns:
        the two paths.
    """
    info = info or machine_info()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name] + sys.argv)
    parts = [f"# {title}", "", f"Machine: {describe_machine(info)}", "", f"Command: `{command}`", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    md = out_dir / f"{name}.md"
    js = out_dir / f"{name}.json"
    md.write_text("\n".join(parts))
    js.write_text(json.dumps({"machine": info, "command": command, **data}, indent=2, default=str) + "\n")
    print(f"wrote {md} and {js}", flush=True)
    return md, js
