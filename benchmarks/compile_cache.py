r"""What JAX's persistent compilation cache
(``jaxgrad.pipeline.runtime.enable_compilation_cache``) saves
a pipeline run, as a user meets it: the same config run three times in fresh processes.

  python benchmarks/compile_cache.py [--config=configs/demo.py:tiny]

1. cache off (``JAXGRAD_COMPILATION_CACHE=off``): every program compiled;
2. cache on, empty: what the first run after installing costs (within one run, the fine-tunes
   and the fidelity fine-tunes already reuse programs compiled by the stages before them);
3. cache on, warm (the same cache directory): a later run of the same config.

Each run is ``scripts/run_pipeline.py`` into a fresh run directory; the wall time of the whole
process is measured (imports and compilation included). The three runs' reports must be equal
(results do not depend on the cache); the script checks it. Appends "## Persistent compilation
cache" to benchmarks/RESULTS.md and writes benchmarks/results/compile_cache.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import RESULTS, append_section, cpu_model, update_results  # noqa: E402

HEADING = "## Persistent compilation cache"
JSON_PATH = os.path.join(ROOT, "benchmarks", "results", "compile_cache.json")


def run(config: str, workdir: str, cache: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")
           and not k.startswith("JAX_PERSISTENT_CACHE")}
    env["JAXGRAD_COMPILATION_CACHE"] = cache
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_pipeline.py"),
                    f"--config={config}", f"--workdir={workdir}"], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.py:tiny")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="jaxgrad-cc-")
    cache = os.path.join(tmp, "cache")
    rows, reports = [], []
    for name, cache_dir in (("off", "off"), ("on, empty", cache), ("on, warm", cache)):
        workdir = os.path.join(tmp, f"run{len(rows)}")
        seconds = run(args.config, workdir, cache_dir)
        body = open(os.path.join(workdir, "report.md")).read()
        # the report names its run directory and the stage times: everything else must agree
        reports.append([line for line in body.splitlines() if workdir not in line
                        and not re.fullmatch(r"\| \w+ \| [\d.]+ \|", line)])
        rows.append({"cache": name, "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    same = all(r == reports[0] for r in reports[1:])
    shutil.rmtree(tmp, ignore_errors=True)
    if not same:
        raise SystemExit("the reports differ between the runs: the cache changed a result")
    cmd = f"python benchmarks/compile_cache.py --config={args.config}"
    off, cold, warm = (r["seconds"] for r in rows)
    lines = [f"### {datetime.date.today()}, {cpu_model()}, {os.cpu_count()} cores", "",
             f"- command: `{cmd}`; each run a fresh `scripts/run_pipeline.py` process into a new "
             "run directory (wall time, imports and compilation included); the three reports "
             "are equal", "",
             "| cache | seconds | vs off |", "|---|---|---|"]
    lines += [f"| {r['cache']} | {r['seconds']:.1f} | {r['seconds'] / off:.2f} |" for r in rows]
    lines += ["", f"Measured in one session, one after the other: an empty cache saves "
                  f"{100 * (1 - cold / off):.0f}% of a run (programs compiled once serve the "
                  f"later stages), a warm one {100 * (1 - warm / off):.0f}%."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_section(RESULTS, HEADING, text)
        update_results(JSON_PATH, runs=rows, config=args.config, command=cmd)


if __name__ == "__main__":
    main()
