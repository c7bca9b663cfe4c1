"""Benchmark of jaxgrad.gradients.projection: time ``project`` and ``lift`` and append the figures to
benchmarks/RESULTS.md under "## Projection (<PLATFORM>)".

Run from the repository root::

    .venv/bin/python benchmarks/projection.py                    # CPU, XLA path (~1 min)
    .venv/bin/python benchmarks/projection.py --backend pallas   # GPU/TPU; checks Pallas == XLA

Each case is compiled once, then all cases are timed round-robin ``--repeats`` times (so that
load from other processes hits them alike) and the median of each is reported. Throughput is given
as P entries generated per second (D·k / t) and as matmul GFLOP/s (2·N·D·k / t). Ratios quoted
in the table footer are measured within the same run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxgrad.gradients.projection import Projector
from common import RESULTS, append_section, cpu_model  # benchmarks/common.py (the script's folder)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="xla", choices=["xla", "pallas", "auto"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dim", type=int, default=10**6)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    dev = jax.devices()[0]
    dim = args.dim
    load = os.getloadavg()[0]  # other processes on a shared machine inflate the times
    cases = [  # (what, n, k, kind, dtype)
        ("project", 32, 1024, "rademacher", jnp.float32),
        ("project", 32, 4096, "rademacher", jnp.float32),
        ("project", 256, 1024, "rademacher", jnp.float32),
        ("project", 32, 1024, "rademacher", jnp.bfloat16),
        ("project", 32, 1024, "gaussian", jnp.float32),
        ("lift", 1, 1024, "rademacher", jnp.float32),
        ("lift", 8, 1024, "rademacher", jnp.float32),
    ]
    key = jax.random.key(0)
    prepared = []
    for what, n, k, kind, dtype in cases:
        proj = Projector(seed=0, dim=dim, k=k, kind=kind, backend=args.backend)
        if what == "project":
            x = jax.random.normal(key, (n, dim), jnp.float32).astype(dtype)
        else:
            x = jax.random.normal(key, (n, k), jnp.float32)
        fn = getattr(proj, what)
        if args.backend != "xla":  # the accelerator kernels must agree with the XLA path
            ref = getattr(Projector(seed=0, dim=dim, k=k, kind=kind, backend="xla"), what)(x)
            err = float(jnp.max(jnp.abs(fn(x) - ref)) / jnp.max(jnp.abs(ref)))
            if err > 1e-4:
                raise SystemExit(f"{what} {kind} n={n} k={k}: {args.backend} differs from XLA "
                                 f"by {err:.2e} (relative to max |ref|)")
        jax.block_until_ready(fn(x))  # compile
        prepared.append(((what, n, k, kind, jnp.dtype(dtype).name), fn, x))
    # Round-robin over the cases, so that load from other processes on a shared machine hits
    # all of them alike; the median of each case is reported.
    times = {case: [] for case, _, _ in prepared}
    for _ in range(args.repeats):
        for case, fn, x in prepared:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x))
            times[case].append(time.perf_counter() - t0)
    seconds = {case: statistics.median(ts) for case, ts in times.items()}
    rows = []
    for (what, n, k, kind, dtype), t in seconds.items():
        rows.append(f"| {what} | {n} | {dim:.0e} | {k} | {kind} | {dtype} | {t * 1e3:.0f} | "
                    f"{dim * k / t / 1e9:.2f} | {2 * n * dim * k / t / 1e9:.0f} |")
        print(rows[-1], flush=True)

    base = seconds[("project", 32, 1024, "rademacher", "float32")]
    rel = {name: seconds[key] / base for name, key in [
        ("gaussian / rademacher", ("project", 32, 1024, "gaussian", "float32")),
        ("bfloat16 / float32", ("project", 32, 1024, "rademacher", "bfloat16")),
        ("N=256 / N=32", ("project", 256, 1024, "rademacher", "float32")),
        ("k=4096 / k=1024", ("project", 32, 4096, "rademacher", "float32")),
        ("lift(S=1) / project(N=32)", ("lift", 1, 1024, "rademacher", "float32")),
    ]}
    ratios = [f"{name} = {r:.2f}" for name, r in rel.items()]
    plat = dev.platform.upper()
    machine = (f"{cpu_model()}, {os.cpu_count()} cores" if dev.platform == "cpu"
               else f"{dev.device_kind} (host: {cpu_model()}, {os.cpu_count()} cores)")
    block = "\n".join([
        f"### {datetime.date.today().isoformat()} — {machine}",
        "",
        f"jax {jax.__version__}, backend `{args.backend}`, median of {args.repeats} runs per case "
        f"after compilation, cases timed round-robin, 1-minute load average {load:.1f} at the "
        "start. Command: `"
        + " ".join([os.path.basename(sys.executable)] + sys.argv) + "`",
        "",
        "| op | N or S | D | k | kind | dtype | ms | P entries / s (1e9) | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Ratios within this run: " + "; ".join(ratios) + ".",
        "",
    ])
    print(block)
    if not args.no_write:
        append_section(RESULTS, f"## Projection ({plat})", block)


if __name__ == "__main__":
    main()
