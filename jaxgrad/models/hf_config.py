"""How jaxgrad reads a Hugging Face ``config.json``: rules shared by every model family.

- :func:`resolve_dtype`: the one dtype rule of ``jaxgrad.models`` (float32 or bfloat16; float16
  and everything else refused by name);
- :data:`ACTIVATIONS`: transformers' ``ACT2FN`` names jaxgrad computes;
- the rule every config.json key falls under (:data:`RULES`: computed, inert, not applied,
  refused), the keys every model type shares (:data:`GENERIC_FIELDS`, :data:`GENERIC_EXTRAS`),
  :func:`field_table` (one family's table, keys grouped by rule), :func:`refuse` /
  :func:`check_refused_fields` (a ``ValueError`` naming the file, the field and the value) and
  :class:`Reader` (values with transformers' defaults, checked as they are read).

Each family module (``llama``, ``gemma3``, ``gpt2``, ``gpt_neox``, ``t5``) declares its own
table of keys with these rules; ``docs/config_fields.md`` and ``docs/models/*.md`` list them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ---- the one dtype rule ---------------------------------------------------------------------------

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: Any, what: str = "dtype"):
    """``jnp.float32`` or ``jnp.bfloat16`` for ``dtype`` given as a name (``"float32"``,
    ``"bfloat16"``) or as a numpy / JAX dtype or scalar type.

    Every other dtype is refused with a ValueError naming ``what`` and the value: float16 (T5's
    activations overflow its range: transformers clamps them and keeps ``wo`` in float32, which
    jaxgrad does not reproduce), float64, integer types, torch dtypes, unknown names.
    """
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name in DTYPES:
        return DTYPES[name]
    why = ("jaxgrad supports float16 for no model (its range, max 65504, overflows in T5's "
           "feed-forward activations, which transformers works around with clamps and float32 "
           "`wo` weights that jaxgrad does not reproduce); use 'bfloat16' for half precision"
           if name == "float16" else "jaxgrad computes and stores in float32 or bfloat16 only")
    raise ValueError(f"{what}={dtype!r} is not supported: {why}; expected one of "
                     f"{sorted(DTYPES)} (a name, or the numpy/JAX dtype)")


def resolve_config_dtypes(cfg: Any) -> None:
    """Set a frozen model config's ``dtype`` and ``param_dtype`` to :func:`resolve_dtype` of
    their values (called from every family config's ``__post_init__``); raises its ValueError."""
    object.__setattr__(cfg, "dtype", resolve_dtype(cfg.dtype, "dtype"))
    object.__setattr__(cfg, "param_dtype", resolve_dtype(cfg.param_dtype, "param_dtype"))


def check_option(owner: str, field: str, value: Any, allowed) -> None:
    """Refuse a model config's option value outside ``allowed`` (names, e.g. :data:`ACTIVATIONS`).

    Raises:
      ValueError: ``"<owner>: <field>=<value> is not supported; supported: <allowed>"``.
    """
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{owner}: {field}={value!r} is not supported; "
                         f"supported: {', '.join(allowed)}")


# ---- activations (transformers.activations.ACT2FN names) -------------------------------------------

ACTIVATIONS = {
    "silu": jax.nn.silu,  # SiLUActivation: x * sigmoid(x)
    "swish": jax.nn.silu,  # nn.SiLU
    "relu": jax.nn.relu,  # nn.ReLU
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # GELUActivation: erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # NewGELUActivation: tanh form
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GELUTanh
}

# ---- config.json keys -------------------------------------------------------------------------------

COMPUTED = "computed"  # read, and its effect on the logits reproduced (some values refused)
INERT = "inert"  # no effect on transformers' forward pass either (metadata, init, generation)
NOT_APPLIED = "not applied"  # training-time base-model dropout: jaxgrad applies none
REFUSED = "refused"  # any value but the default is refused
RULES = (COMPUTED, INERT, NOT_APPLIED, REFUSED)


def field_table(*bases: dict[str, tuple[Any, str]], computed: dict[str, Any] | None = None,
                inert: dict[str, Any] | None = None, not_applied: dict[str, Any] | None = None,
                refused: dict[str, Any] | None = None) -> dict[str, tuple[Any, str]]:
    """A table of config.json keys, ``{key: (transformers' default, rule)}``: the ``bases``
    tables, then the keys of each rule with their defaults (``{key: default}``), which override a
    base's entry of the same key.

    Example:
      >>> field_table(inert={"use_cache": True}, refused={"is_causal": True})
      {'use_cache': (True, 'inert'), 'is_causal': (True, 'refused')}

    Raises:
      ValueError: a key given under two rules.
    """
    table: dict[str, tuple[Any, str]] = {}
    for base in bases:
        table.update(base)
    groups = {COMPUTED: computed, INERT: inert, NOT_APPLIED: not_applied, REFUSED: refused}
    seen: dict[str, str] = {}
    for rule, keys in groups.items():
        for key, default in (keys or {}).items():
            if key in seen:
                raise ValueError(f"field_table: {key!r} is both {seen[key]} and {rule}")
            seen[key] = rule
            table[key] = (default, rule)
    return table


# PreTrainedConfig's own dataclass fields (configuration_utils.py), shared by every model type.
GENERIC_FIELDS = field_table(inert=dict(
    transformers_version=None, architectures=None, output_hidden_states=False, return_dict=True,
    dtype=None, chunk_size_feed_forward=0, is_encoder_decoder=False, id2label=None,
    label2id=None, problem_type=None))
# Keys no config class declares but that transformers reads for every model type here.
GENERIC_EXTRAS = field_table(
    computed=dict(model_type=None),  # picks the architecture
    inert=dict(torch_dtype=None),  # transformers-4 name of `dtype`
    refused=dict(is_causal=True,  # masking_utils: False makes the causal mask bidirectional
                 quantization_config=None))  # from_pretrained dequantizes / replaces layers


def refuse(source: str, field: str, value: Any, why: str, *,
           doc: str = "docs/config_fields.md") -> None:
    """Raise the ValueError every unsupported config value gets: file, field, value, reason, and
    ``doc``, the family's table of config keys."""
    raise ValueError(f"{source}: {field}={value!r} is not supported: {why} (see {doc})")


def check_refused_fields(cfg: dict, fields: dict[str, tuple[Any, str]], source: str, *,
                         doc: str = "docs/config_fields.md") -> None:
    """Refuse every key whose rule is ``refused`` and whose value is not the default."""
    for name, (default, rule) in fields.items():
        if rule == REFUSED and name in cfg and cfg[name] != default:
            why = {"is_causal": "a bidirectional decoder (is_causal=false) is not implemented",
                   "quantization_config": "quantized checkpoints are not supported; use a float "
                                          "checkpoint (or a GGUF, which jaxgrad dequantizes)"}
            refuse(source, name, cfg[name], why.get(name, "not implemented"), doc=doc)


class Reader:
    """``config.json`` values with transformers' defaults for the model type (``fields``, a
    :func:`field_table`), checked as they are read: a refused value raises :func:`refuse`'s
    ValueError naming ``source``, the key the value came from, the value and ``doc``.

    ``aliases`` is the config class's ``attribute_map`` (alias -> field): a non-null value under
    an alias wins over its field (:meth:`field`).
    """

    def __init__(self, cfg: dict, fields: dict[str, tuple[Any, str]], source: str = "config.json",
                 *, doc: str = "docs/config_fields.md", aliases: dict[str, str] | None = None):
        self.cfg, self.fields, self.source, self.doc = cfg, fields, source, doc
        self.aliases = dict(aliases or {})

    def __call__(self, name: str) -> Any:
        return self.cfg[name] if name in self.cfg else self.fields[name][0]

    def refuse(self, name: str, value: Any, why: str) -> None:
        refuse(self.source, name, value, why, doc=self.doc)

    def check_refused(self, *, skip=()) -> None:
        """:func:`check_refused_fields` over the table, but the keys in ``skip`` (checked by the
        family itself, with its own reasons)."""
        check_refused_fields(self.cfg, {k: v for k, v in self.fields.items() if k not in skip},
                             self.source, doc=self.doc)

    def field(self, name: str) -> tuple[Any, str]:
        """``(value, the key it came from)``: an alias of ``name`` with a non-null value, else
        ``name`` itself (its default when absent)."""
        for alias, target in self.aliases.items():
            if target == name and self.cfg.get(alias) is not None:
                return self.cfg[alias], alias
        return self(name), name

    def values(self, *names: str) -> dict[str, Any]:
        """``{name: value}`` of the fields a config takes as they are (an alias winning, as in
        :meth:`field`)."""
        return {name: self.field(name)[0] for name in names}

    def positive_int(self, name: str, *, or_none: bool = False) -> int | None:
        """The integer ``>= 1`` under ``name`` (or an alias); ``None`` too with ``or_none``."""
        value, key = self.field(name)
        if value is None and or_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.refuse(key, value, "expected a positive integer" + " or null" * or_none)
        return value

    def number(self, name: str, *, positive: bool = False, or_none: bool = False):
        """The number under ``name``, non-negative (``> 0`` with ``positive``), as written;
        ``None`` too with ``or_none``."""
        value = self(name)
        if value is None and or_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                or (positive and value == 0):
            kind = "positive" if positive else "non-negative"
            self.refuse(name, value, f"expected a {kind} number" + " or null" * or_none)
        return value

    def option(self, name: str, allowed) -> str:
        """The name under ``name``, one of ``allowed`` (e.g. :data:`ACTIVATIONS`)."""
        value = self(name)
        if not isinstance(value, str) or value not in allowed:
            self.refuse(name, value, f"supported: {', '.join(allowed)}")
        return value
