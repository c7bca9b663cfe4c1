"""Groups of training samples as the units GradEx selects: whole sources, or clusters of samples.

The paper's chain-of-thought experiments (GradEx, EMNLP 2024, §5) do not select whole tasks: they
group the target task's training samples into clusters by their projected gradients (average
linkage) and select clusters. With ``groups.by = "cluster"`` the pipeline's ``groups`` stage does
the same after the gradient stage, and every later stage (estimates, selection, final fine-tunes,
fidelity, report) treats each group as a "source":

* the train samples of ``groups.sources`` (all train sources when empty) are clustered together
  into ``groups.num_clusters`` clusters of their stored projected gradients
  (:func:`jaxgrad.groups.clusters.cluster_samples`, cosine distance), named ``c00``, ``c01``, ...;
* every other train source stays one unit under its own name;
* ``<workdir>/groups/groups.json`` records each unit: name, the source(s) of its samples, its
  sample ids (the gradient store's ``example_ids``) and its size.

Memory (N clustered samples, k = projection dimension, C clusters):

* ``agglomerative``: scipy's condensed cosine distance matrix, N(N-1)/2 float64 (8 bytes each), plus
  the features: 0.4 GB at N = 10k, 1.6 GB at 20k, 40 GB at 100k. Refused above
  :data:`AGGLOMERATIVE_MAX_SAMPLES` before any stage runs.
* ``kmeans``: spherical k-means in JAX: the unit-norm features N·k float32 plus N·C similarities
  per restart (4 restarts): no N×N matrix (``benchmarks/cluster_memory.py`` measures it at N = 100k).

``groups.by = "source"`` (the default) is the method on whole sources, as before this module.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from jaxgrad.common.checks import as_names
from jaxgrad.common.jsonio import read_json
from jaxgrad.config import GROUP_BY, GROUP_METHODS, GROUP_METRICS, GroupsSection
from jaxgrad.groups.clusters import cluster_samples

log = logging.getLogger("jaxgrad.groups")

AGGLOMERATIVE_MAX_SAMPLES = 20_000  # 1.6 GB of float64 distances
CLUSTER_PREFIX = "c"


@dataclasses.dataclass(frozen=True)
class GroupsSpec(GroupsSection):
    """The ``groups`` config section, checked. Its fields and their defaults are declared by
    :class:`jaxgrad.config.GroupsSection` (the one source of the section's defaults).

    Attributes:
      by: ``"source"`` (each train source is a unit) or ``"cluster"`` (the paper's CoT protocol:
        clusters of samples by projected gradient, made after the gradients stage).
      sources: the train sources whose samples are clustered (empty: all of them); read only with
        ``by="cluster"``. On the command line a tuple, as names may hold commas:
        ``--config.groups.sources="('a', 'b')"``.
      num_clusters: C, clusters made of those samples (int >= 1), named c00, c01, ...
      method: ``"agglomerative"`` (average linkage, scipy; exact, N(N-1)/2 float64 distances: up
        to :data:`AGGLOMERATIVE_MAX_SAMPLES` samples) or ``"kmeans"`` (spherical k-means in JAX;
        O(N·(k + C)) memory, no N×N matrix).
      metric: ``"cosine"`` (the only one: projected gradients differ mostly in norm across
        samples, so only their direction is compared).
      seed: k-means seeding (int >= 0).
      max_iter: k-means Lloyd iterations at most.
    """

    @classmethod
    def from_config(cls, section: Any | None) -> "GroupsSpec":
        """From ``config.groups`` (None or missing keys: the defaults).

        Raises:
          ValueError: naming the ``config.groups.<key>`` and the values it accepts.
        """
        d = {} if section is None else (section.to_dict() if hasattr(section, "to_dict")
                                        else dict(section))
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config.groups: unknown keys {unknown}; expected some of "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        spec = cls(**d)
        for key, allowed in (("by", GROUP_BY), ("method", GROUP_METHODS),
                             ("metric", GROUP_METRICS)):
            if getattr(spec, key) not in allowed:
                raise ValueError(f"config.groups.{key} must be one of {allowed}, got "
                                 f"{getattr(spec, key)!r}")
        sources = spec.sources
        if isinstance(sources, str):
            sources = as_names(sources)
        for key in ("num_clusters", "max_iter", "seed"):
            value = getattr(spec, key)
            low = 0 if key == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"config.groups.{key} must be a whole number >= {low}, got "
                                 f"{value!r}")
        return dataclasses.replace(spec, sources=tuple(str(s) for s in sources),
                                   num_clusters=int(spec.num_clusters), seed=int(spec.seed),
                                   max_iter=int(spec.max_iter))

    @property
    def clustered(self) -> bool:
        return self.by == "cluster"

    def clustered_sources(self, sources: Sequence[str]) -> list[str]:
        """The train sources whose samples are clustered, in ``sources`` order.

        Raises:
          ValueError: ``groups.sources`` names a source the data do not have.
        """
        unknown = [s for s in self.sources if s not in sources]
        if unknown:
            raise ValueError(f"config.groups.sources: unknown sources {unknown}; available: "
                             f"{list(sources)}")
        return [s for s in sources if not self.sources or s in self.sources]

    def check(self, n_samples_by_source: Mapping[str, int]) -> None:
        """What can be checked before the first stage, from the train split sizes.

        Raises:
          ValueError: more clusters than samples; agglomerative clustering over more than
            :data:`AGGLOMERATIVE_MAX_SAMPLES` samples; a cluster name taken by a source.
        """
        names = list(n_samples_by_source)
        if not self.clustered:
            if self.sources:
                raise ValueError(f"config.groups.sources = {list(self.sources)} is read only with "
                                 "groups.by = 'cluster' (groups.by is 'source'); set one or clear "
                                 "the other")
            return
        chosen = self.clustered_sources(names)
        n = sum(int(n_samples_by_source[s]) for s in chosen)
        if self.num_clusters > n:
            raise ValueError(f"config.groups.num_clusters = {self.num_clusters} is more than the "
                             f"{n} train samples of {chosen} to cluster")
        if self.method == "agglomerative" and n > AGGLOMERATIVE_MAX_SAMPLES:
            gb = n * (n - 1) / 2 * 8 / 1e9
            raise ValueError(f"config.groups.method = 'agglomerative' on {n} samples needs their "
                             f"{n * (n - 1) // 2:,} pairwise distances ({gb:.1f} GB of float64); "
                             f"the limit is {AGGLOMERATIVE_MAX_SAMPLES:,} samples. Use "
                             "groups.method = 'kmeans' (no N×N matrix) or cluster fewer sources "
                             "(groups.sources)")
        taken = sorted(set(cluster_names(self.num_clusters)) & (set(names) - set(chosen)))
        if taken:
            raise ValueError(f"config.groups: the cluster names {taken} are also names of "
                             "unclustered sources; rename those sources or cluster them too")


def cluster_names(n: int) -> list[str]:
    """``c00``, ``c01``, ... (zero-padded to the width of ``n - 1``, at least 2 digits).

    Args:
      n: the number of clusters (>= 0).

    Returns:
      n unit names, str, in cluster order (``CLUSTER_PREFIX`` + index).
    """
    width = max(2, len(str(n - 1)))
    return [f"{CLUSTER_PREFIX}{i:0{width}d}" for i in range(n)]


def make_groups(spec: GroupsSpec, feats_NxK: np.ndarray, example_ids: Sequence[str],
                source_ids: Sequence[str], sources: Sequence[str]) -> dict:
    """The units of ``spec`` over the gradient store's train rows; the ``groups.json`` record.

    Args:
      spec: the checked ``groups`` section (``by = "cluster"``).
      feats_NxK: the train store's projected gradients (N rows, any float dtype).
      example_ids, source_ids: the store's N row ids and their sources.
      sources: the data's train sources, in order.

    Returns:
      ``{"by", "method", "metric", "num_clusters", "clusters_made", "seed",
      "clustered_sources", "units"}`` (``clusters_made`` < ``num_clusters`` when k-means left
      clusters empty: they are dropped),
      ``units`` a list of ``{"name", "kind": "cluster" | "source", "sources": {source: count},
      "size", "example_ids"}``: the clusters first (numbered by their first sample in store
      order), then the unclustered sources in ``sources`` order.
    """
    chosen = spec.clustered_sources(sources)
    source_ids = np.asarray(list(source_ids))
    rows = np.flatnonzero(np.isin(source_ids, chosen))
    spec.check({s: int(np.sum(source_ids == s)) for s in sources})
    feats = np.asarray(feats_NxK, np.float64 if spec.method == "agglomerative" else np.float32)
    zero = rows[np.linalg.norm(feats[rows], axis=1) == 0]
    if spec.method == "agglomerative" and zero.size:
        raise ValueError(f"groups.method = 'agglomerative': {zero.size} train samples have a "
                         f"projected gradient of norm 0 (no cosine distance), e.g. "
                         f"{[example_ids[int(r)] for r in zero[:3]]} (a completion cut off by "
                         "train.max_length, or a gradient that vanishes at θ*); use groups.method "
                         "= 'kmeans', which puts them in one cluster. The gradients are kept.")
    labels = np.asarray(cluster_samples(feats[rows], spec.num_clusters, method=spec.method,
                                        seed=spec.seed, max_iter=spec.max_iter))
    # k-means can leave a cluster empty (repeated rows, fewer directions than clusters): a unit
    # without samples cannot be fine-tuned on, so it is dropped and the others renumbered.
    made = [c for c in range(spec.num_clusters) if np.any(labels == c)]
    if len(made) < spec.num_clusters:
        log.warning("groups: %d of the %d k-means clusters are empty; %d clusters made",
                    spec.num_clusters - len(made), spec.num_clusters, len(made))
    units = []
    for c, name in zip(made, cluster_names(len(made))):
        members = rows[labels == c]
        units.append(_unit(name, "cluster", members, example_ids, source_ids))
    for s in sources:
        if s not in chosen:
            units.append(_unit(s, "source", np.flatnonzero(source_ids == s), example_ids,
                               source_ids))
    return {"by": spec.by, "method": spec.method, "metric": spec.metric,
            "num_clusters": spec.num_clusters, "clusters_made": len(made), "seed": spec.seed,
            "clustered_sources": chosen, "units": units}


def _unit(name, kind, rows, example_ids, source_ids) -> dict:
    srcs, n = np.unique(source_ids[rows], return_counts=True)
    return {"name": name, "kind": kind, "size": int(len(rows)),
            "sources": {str(s): int(k) for s, k in zip(srcs, n)},
            "example_ids": [example_ids[int(r)] for r in rows]}


@dataclasses.dataclass(frozen=True)
class Units:
    """The units the pipeline selects among: names, and the train examples each one holds.

    ``members`` is None for whole sources (a unit is a source name) and else maps each unit's name
    to its example ids (``groups.json``).
    """

    names: list[str]
    members: dict[str, list[str]] | None = None
    record: dict | None = None

    @classmethod
    def of_sources(cls, sources: Sequence[str]) -> "Units":
        return cls(list(sources))

    @classmethod
    def from_record(cls, record: Mapping) -> "Units":
        units = record["units"]
        return cls([u["name"] for u in units], {u["name"]: list(u["example_ids"]) for u in units},
                   dict(record))

    @classmethod
    def from_file(cls, path: str) -> "Units":
        """From a ``groups.json`` written by the groups stage.

        Raises:
          ValueError: the file is not a groups record (no ``units`` list).
        """
        record = read_json(path)
        if not isinstance(record, Mapping) or not isinstance(record.get("units"), list):
            raise ValueError(f"{path}: not a groups record (expected a JSON object with a 'units' "
                             "list, as the pipeline's groups stage writes)")
        return cls.from_record(record)

    def row_ids(self, example_ids: Sequence[str], source_ids: Sequence[str]) -> np.ndarray:
        """The unit index (into :attr:`names`) of each store row.

        Raises:
          ValueError: a row in no unit (the groups were made from another store).
        """
        if self.members is None:
            index = {name: i for i, name in enumerate(self.names)}
            keys = source_ids
        else:
            index = {e: i for i, name in enumerate(self.names) for e in self.members[name]}
            keys = example_ids
        missing = [k for k in keys if k not in index]
        if missing:
            raise ValueError(f"{len(missing)} gradient-store rows belong to no unit (first: "
                             f"{missing[:3]}); the groups were made from another store: rerun the "
                             "groups stage (--on_config_change=rerun)")
        return np.array([index[k] for k in keys], np.int64)

    def examples(self, data, split: str, names: Sequence[str]) -> list[dict]:
        """The ``split`` examples of the units ``names`` (sources: their examples; clusters: the
        train examples whose ids they hold, in data order).

        Raises:
          ValueError: an unknown unit name.
        """
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"unknown units {unknown}; available: {self.names}")
        if self.members is None:
            return data.examples(split, list(names))
        if split != "train":
            raise ValueError(f"units that are clusters hold train samples only, not {split!r}")
        wanted = {e for n in names for e in self.members[n]}
        out = [e for e in data.examples(split) if e["example_id"] in wanted]
        if len(out) != len(wanted):
            found = {e["example_id"] for e in out}
            missing = sorted(wanted - found)
            raise ValueError(f"{len(missing)} samples of units {list(names)} are not in the data's "
                             f"train split (first: {missing[:3]}): the groups record was made "
                             "from other data")
        return out

    def kinds(self, source_kinds: Mapping[str, str]) -> dict[str, str]:
        """A unit's kind (target / related / noisy / unrelated): its sources' kind when they
        share one, else "mixed"."""
        if self.record is None:
            return dict(source_kinds)
        out = {}
        for u in self.record["units"]:
            ks = {source_kinds.get(s) for s in u["sources"]}
            ks.discard(None)
            if ks:
                out[u["name"]] = ks.pop() if len(ks) == 1 else "mixed"
        return out

    def sizes(self) -> dict[str, int] | None:
        if self.record is None:
            return None
        return {u["name"]: int(u["size"]) for u in self.record["units"]}
