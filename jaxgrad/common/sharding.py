"""Device mesh, parameter partitioning by name, and batch sharding.

The mesh has two axes: ``"data"`` (batch parallelism, and FSDP when enabled) and ``"model"``
(tensor parallelism). Both are ``AxisType.Auto``: jax 0.10's ``jax.make_mesh`` defaults to
``Explicit`` axes, under which every op must agree on shardings by type; with ``Auto`` axes we
place the inputs (``jax.jit(in_shardings=...)``) and let XLA's propagation shard the rest, as the
models carry no sharding annotations.

Parameters are partitioned by regular expressions over their Hugging Face names (module path ==
safetensors key, ``model.layers.0.self_attn.q_proj.weight``), in the style of t5x /
big_vision: an ordered list of ``(regex, PartitionSpec)``, the first rule whose regex
``fullmatch``-es the name wins. Rules live in the config; :data:`DEFAULT_RULES` covers the
Llama (Gemma 3 shares its names), T5, GPT-2 and GPT-NeoX families with Megatron-style tensor
parallelism over ``"model"`` (weights in torch layout ``[out, in]``; GPT-2's Conv1D ``[in, out]``
takes the same splits on the other axis):

- column-parallel (q/k/v, gate/up; T5 q/k/v, wi*; GPT-2 c_attn, c_fc; GPT-NeoX
  query_key_value, dense_h_to_4h): split the outputs;
- row-parallel (o, down; T5 o, wo; GPT-2 c_proj; GPT-NeoX attention.dense, dense_4h_to_h):
  split the inputs;
- embeddings and the LM head ``[vocab, hidden]``: split the vocabulary;
- LoRA: ``lora_B [out, r]`` follows a column-parallel weight's output split, ``lora_A [r, in]``
  a row-parallel weight's input split; the other factor is replicated (it is tiny);
- everything else (norms, biases, relative-position tables) replicated.

``fsdp=True`` then shards, for every parameter, the largest dimension the rules left unsharded
over ``"data"`` (ZeRO-3 style: parameters and optimizer state are gathered per use).

A dimension is only sharded when the mesh axis divides it; otherwise that dimension falls back to
replicated. The fallback is deterministic (same names and shapes, same shardings), so every host
computes the same layout.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
AXIS_NAMES = (DATA_AXIS, MODEL_AXIS)

Rules = Sequence[tuple[str, P]]

_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|q|k|v|wi|wi_0|wi_1|query_key_value|dense_h_to_4h)"
_ROW = r"(o_proj|down_proj|o|wo|attention\.dense|dense_4h_to_h)"
# GPT-2's Conv1D layers store [in, out]: the same splits on the other axis.
_CONV_COLUMN = r"(attn\.c_attn|mlp\.c_fc)"
_CONV_ROW = r"(attn\.c_proj|mlp\.c_proj)"

DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    # LoRA factors first: they sit under the same module names as the weights.
    (rf".*\.{_COLUMN}\.lora_B", P(MODEL_AXIS, None)),
    (rf".*\.{_ROW}\.lora_A", P(None, MODEL_AXIS)),
    (rf".*\.{_CONV_COLUMN}\.lora_B", P(MODEL_AXIS, None)),
    (rf".*\.{_CONV_ROW}\.lora_A", P(None, MODEL_AXIS)),
    (r".*\.lora_[AB]", P()),
    (rf".*\.{_CONV_COLUMN}\.weight", P(None, MODEL_AXIS)),
    (rf".*\.{_CONV_ROW}\.weight", P(MODEL_AXIS, None)),
    # Llama family and T5 family, torch layout [out, in].
    (rf".*\.{_COLUMN}\.weight", P(MODEL_AXIS, None)),
    (rf".*\.{_ROW}\.weight", P(None, MODEL_AXIS)),
    # Embedding tables and LM heads [vocab, hidden]: split the vocabulary.
    (r"(.*\.)?(embed_tokens|shared|lm_head|wte|embed_in|embed_out)\.weight", P(MODEL_AXIS, None)),
    # Norms, biases, relative attention bias tables, ...
    (r".*", P()),
)


def make_mesh(data: int = -1, model: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "model")`` mesh with ``Auto`` axes over ``devices`` (default: all devices).

    Args:
      data: size of the data axis; -1 takes all devices left after ``model``.
      model: size of the model (tensor-parallel) axis.
      devices: devices to use (default ``jax.devices()``).

    Raises:
      ValueError: the sizes are not positive or do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not isinstance(model, (int, np.integer)) or model < 1:
        raise ValueError(f"make_mesh: model must be a positive int, got {model!r}")
    if data == -1:
        if n % model:
            raise ValueError(f"make_mesh: model={model} does not divide the {n} devices")
        data = n // model
    if not isinstance(data, (int, np.integer)) or data < 1:
        raise ValueError(f"make_mesh: data must be a positive int or -1, got {data!r}")
    if data * model != n:
        raise ValueError(f"make_mesh: data={data} x model={model} = {data * model} devices, but "
                         f"{n} are available; use data=-1 to take all of them")
    return jax.make_mesh((int(data), int(model)), AXIS_NAMES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def path_name(path: Sequence[Any]) -> str:
    """Dotted parameter name of a pytree key path (``model.layers.0.mlp.up_proj.weight``).

    ``nnx.State`` paths end with the Variable's ``.value`` attribute, which is dropped.
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        else:
            parts.append(str(getattr(key, "key", key)))
    return ".".join(parts)


def _axis_size(mesh: Mesh, axis: Any) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in names]))


def _validate_rules(rules: Rules, mesh: Mesh) -> list[tuple[re.Pattern, P]]:
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"partition rule {i} must be a (regex, PartitionSpec) pair, got "
                             f"{rule!r}")
        pattern, spec = rule
        if not isinstance(spec, P):
            spec = P(*spec)
        for axis in spec:
            for a in (axis if isinstance(axis, tuple) else (axis,)):
                if a is not None and a not in mesh.shape:
                    raise ValueError(f"partition rule {pattern!r}: axis {a!r} is not a mesh axis "
                                     f"{tuple(mesh.shape)}")
        try:
            compiled.append((re.compile(pattern), spec))
        except re.error as e:
            raise ValueError(f"partition rule {i}: invalid regex {pattern!r}: {e}") from e
    return compiled


def spec_for(name: str, shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES, *,
             fsdp: bool = False, _compiled=None) -> P:
    """The PartitionSpec of one parameter: first matching rule, divisibility fallback, FSDP."""
    compiled = _compiled if _compiled is not None else _validate_rules(rules, mesh)
    spec = P()
    for regex, candidate in compiled:
        if regex.fullmatch(name):
            spec = candidate
            break
    shape = tuple(int(s) for s in shape)
    if len(spec) > len(shape):
        raise ValueError(f"partition rule for {name!r} gives {spec} ({len(spec)} dims) but the "
                         f"parameter has shape {shape}")
    axes = list(spec) + [None] * (len(shape) - len(spec))
    axes = [a if a is None or shape[i] % _axis_size(mesh, a) == 0 else None
            for i, a in enumerate(axes)]
    data_size = mesh.shape.get(DATA_AXIS, 1)
    if fsdp and data_size > 1 and DATA_AXIS not in axes:
        free = [i for i, a in enumerate(axes) if a is None and shape[i] % data_size == 0]
        if free:
            best = max(free, key=lambda i: (shape[i], -i))  # largest dim; ties -> first
            axes[best] = DATA_AXIS
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def partition_specs(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, *,
                    fsdp: bool = False) -> Any:
    """A tree of PartitionSpecs, one per leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    compiled = _validate_rules(rules, mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(path_name(path), np.shape(x), mesh, fsdp=fsdp, _compiled=compiled),
        tree)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, *,
                    fsdp: bool = False) -> Any:
    """A tree of ``NamedSharding`` for the leaves of ``tree`` (e.g. an ``nnx.State``)."""
    specs = partition_specs(tree, mesh, rules, fsdp=fsdp)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def from_host(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """``x``, a value every process holds whole, as one global array laid out by ``sharding``
    (each process fills its own shards from its host copy; ``jax.device_put`` cannot move data
    between hosts, and orbax saves only global arrays in a multi-process run)."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)``, also across processes: with several processes a
    leaf that this process holds whole (the same value on every process, e.g. restored onto
    one device) becomes a global array from its host copy, and a global leaf is resharded by a
    jitted identity (device_put cannot move data between hosts)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == sharding else jax.jit(lambda a: a,
                                                            out_shardings=sharding)(x)
        return from_host(x, sharding)

    return jax.tree.map(one, tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shard the leading (batch) axis over ``"data"``; other axes replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, P], ...]:
    """Rules written in a config as ``[(regex, (axis_or_None, ...)), ...]``; None -> defaults."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"partition rule {i} must be (regex, axes), got {rule!r}")
        axes = rule[1]
        spec = axes if isinstance(axes, P) else P(*(tuple(a) if isinstance(a, list) else a
                                                     for a in axes))
        out.append((rule[0], spec))
    return tuple(out)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's part of a batch (leading axis sharded over ``"data"``).

    Every process passes its own rows (``process_index``-th shard of the data); the global batch
    is their concatenation in process order. On one process this is a sharded ``device_put``.
    """
    sharding = batch_sharding(mesh)
    nproc = jax.process_count()
    data = mesh.shape[DATA_AXIS]
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * nproc,) + value.shape[1:]
        if global_shape[0] % data:
            raise ValueError(f"shard_batch: {key!r} has a global batch of {global_shape[0]} rows, "
                             f"not divisible by the data axis size {data}; choose batch sizes "
                             "(train and eval) that are multiples of it")
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def local_data_mesh():
    """A ``data`` mesh over this process's devices (None with one): per-sample work shards its
    samples over them. Per-sample gradients are independent, so this changes no result beyond
    float32 rounding (a device's matmuls cover fewer samples and may sum in another order)."""
    devices = jax.local_devices()
    return make_mesh(len(devices), 1, devices=devices) if len(devices) > 1 else None


def global_data_mesh():
    """A ``data`` mesh over every device of every process (None with one device): the surrogate
    fits shard their subsets over it (``jaxgrad.estimate.surrogate.fit_subsets``)."""
    return make_mesh(-1, 1) if jax.device_count() > 1 else None
