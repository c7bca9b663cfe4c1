"""Step 2b of the method (optional): the units selected among — whole sources, or clusters of
training samples by their projected gradients (``groups.by = "cluster"``, the paper's CoT
protocol).

:mod:`~jaxgrad.groups.clusters` clusters samples (:func:`cluster_samples`);
:mod:`~jaxgrad.groups.units` turns the ``groups`` section into units (:class:`GroupsSpec`,
:func:`make_groups`) and reads them back (:class:`Units`).
"""

from jaxgrad._compat import moved_names
from jaxgrad.groups.clusters import cluster_samples
from jaxgrad.groups.units import (
    AGGLOMERATIVE_MAX_SAMPLES,
    CLUSTER_PREFIX,
    GroupsSpec,
    Units,
    cluster_names,
    make_groups,
)

__all__ = [
    "AGGLOMERATIVE_MAX_SAMPLES",
    "CLUSTER_PREFIX",
    "GroupsSpec",
    "Units",
    "cluster_names",
    "cluster_samples",
    "make_groups",
]


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
