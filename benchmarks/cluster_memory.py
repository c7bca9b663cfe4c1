r"""Memory and time of the groups stage's clustering (``jaxgrad.groups.make_groups``) as N grows.

  python benchmarks/cluster_memory.py [--k=1024] [--clusters=100]
      [--kmeans=10000,100000] [--agglomerative=2000,5000,10000]

Each case runs in a fresh Python process on synthetic projected gradients (N rows of dimension k:
``clusters`` planted directions, norms spread over three decades, float32, as a gradient store
holds them) and reports the process's peak resident memory (``ru_maxrss``), the memory of the
features themselves (N·k·4 bytes), the clustering's wall time (compilation included: a user
waits for it) and the adjusted Rand index against the planted directions (sklearn).

* ``kmeans`` (spherical k-means in JAX): no N×N matrix; what it adds to the features is
  O(N·C) similarities per restart.
* ``agglomerative`` (scipy average linkage): N(N-1)/2 float64 distances, the reason
  ``groups.method = "agglomerative"`` is refused above 20,000 samples.

Appends "## Clustering memory (groups stage)" to benchmarks/RESULTS.md and writes
benchmarks/results/cluster_memory.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import RESULTS, append_section, cpu_model, update_results  # noqa: E402

HEADING = "## Clustering memory (groups stage)"
JSON_PATH = os.path.join(ROOT, "benchmarks", "results", "cluster_memory.json")

CHILD = r"""
import json, resource, sys, time
import numpy as np
from sklearn.metrics import adjusted_rand_score
from jaxgrad.groups.units import GroupsSpec, make_groups

method, n, k, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
dirs = rng.normal(size=(c, k)).astype(np.float32)
truth = rng.integers(0, c, n)
feats = dirs[truth] * (10.0 ** rng.uniform(-1.5, 1.5, n)).astype(np.float32)[:, None]
feats += 0.3 * rng.normal(size=(n, k)).astype(np.float32) * np.linalg.norm(feats, axis=1,
    keepdims=True) / np.sqrt(k)
ids = [f"s/{i}" for i in range(n)]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
rec = make_groups(GroupsSpec(by="cluster", num_clusters=c, method=method), feats, ids,
                  ["s"] * n, ["s"])
sec = time.perf_counter() - t0
labels = np.empty(n, int)
for j, u in enumerate(rec["units"]):
    labels[[int(e[2:]) for e in u["example_ids"]]] = j
print(json.dumps({"method": method, "n": n, "k": k, "clusters": c, "seconds": round(sec, 2),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "rss_before_clustering_gb": base / 1e6,
                  "features_gb": n * k * 4 / 1e9,
                  "ari": float(adjusted_rand_score(truth, labels))}))
"""


def run_case(method: str, n: int, k: int, c: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(n), str(k), str(c)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--kmeans", default="10000,100000")
    ap.add_argument("--agglomerative", default="2000,5000,10000")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = []
    for method, ns in (("agglomerative", args.agglomerative), ("kmeans", args.kmeans)):
        for n in [int(x) for x in ns.split(",") if x]:
            rows.append(run_case(method, n, args.k, args.clusters))
            print(rows[-1], flush=True)
    cmd = (f"python benchmarks/cluster_memory.py --k={args.k} --clusters={args.clusters} "
           f"--kmeans={args.kmeans} --agglomerative={args.agglomerative}")
    lines = [f"### {datetime.date.today()}, {cpu_model()}, {os.cpu_count()} cores", "",
             f"- command: `{cmd}`; synthetic float32 features, {args.clusters} planted directions",
             "- peak RSS: the whole process (Python, JAX, the features, the clustering); features: "
             "N·k·4 bytes; seconds include compilation", "",
             "| method | N | k | clusters | seconds | peak RSS (GB) | RSS before clustering (GB) "
             "| features (GB) | ARI vs planted |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['n']:,} | {r['k']} | {r['clusters']} | "
                     f"{r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['rss_before_clustering_gb']:.2f} | {r['features_gb']:.2f} | "
                     f"{r['ari']:.3f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_section(RESULTS, HEADING, text)
        update_results(JSON_PATH, cases=rows, command=cmd)


if __name__ == "__main__":
    main()
