"""Helpers with no step of the method in them, used by every stage: the fraction-or-count rule
(:mod:`~jaxgrad.common.counts`), flat parameter vectors (:mod:`~jaxgrad.common.flat`), JSON files
(:mod:`~jaxgrad.common.jsonio`), progress bars (:mod:`~jaxgrad.common.progress`), device meshes and
partitioning (:mod:`~jaxgrad.common.sharding`), multi-host plumbing
(:mod:`~jaxgrad.common.distributed`), argument checks (:mod:`~jaxgrad.common.checks`), file
digests (:mod:`~jaxgrad.common.digest`) and the checkout's ``configs`` on ``sys.path`` for the
scripts (:mod:`~jaxgrad.common.checkout`).

Nothing is re-exported here: import the module you need (``from jaxgrad.common.flat import
flatten``), so that importing one helper does not import the others.
"""
