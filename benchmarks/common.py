"""What every benchmark script shares: where the figures go and how the machine is named."""

from __future__ import annotations

import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def append_results(text: str) -> None:
    """Append a section to benchmarks/RESULTS.md."""
    with open(RESULTS, "a") as f:
        f.write(text)


def publish(lines: list[str], write: bool) -> None:
    """Print a section and, when ``write``, append it to benchmarks/RESULTS.md."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        append_results(text)


def append_section(path: str, heading: str, block: str) -> None:
    """Insert ``block`` at the end of the ``heading`` section (created at the end of the file if
    missing); every other section is left as it is."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    lines = text.rstrip("\n").split("\n")
    if heading not in lines:
        lines += ["", heading]
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start and not lines[end - 1].strip():
        end -= 1
    new = ["", *block.rstrip("\n").split("\n")]
    if end < len(lines):
        new.append("")
    lines[end:end] = new
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def load_config(spec: str):
    """``"configs/x.py[:arg]"`` -> ``get_config(arg)`` of that file (as ml_collections'
    ``config_flags`` reads it)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):  # relative to the repository root, from any directory
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    module = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(module)
    module.loader.exec_module(mod)
    return mod.get_config(arg or None)


def update_results(path: str, **sections) -> dict:
    """Merge ``sections`` into the JSON object at ``path`` (other keys kept); written atomically.
    Top-level ``date`` and ``machine`` are set to today's and this machine's."""
    import datetime
    import json

    data = {}
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
    data.update(sections)
    data["date"] = str(datetime.date.today())
    data["machine"] = f"{os.cpu_count()} x {cpu_model()}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return data
