"""How jaxgrad reads a Hugging Face ``config.json``: rules shared by every model family.

- :func:`resolve_dtype`: the one dtype rule of ``jaxgrad.models`` (float32 or bfloat16; float16
  and everything else refused by name);
- :data:`ACTIVATIONS`: transformers' ``ACT2FN`` names jaxgrad computes;
- the rule every config.json key falls under (:data:`RULES`: computed, inert, not applied,
  refused), the keys every model type shares (:data:`GENERIC_FIELDS`, :data:`GENERIC_EXTRAS`),
  :func:`refuse` / :func:`check_refused_fields` (a ``ValueError`` naming the file, the field and
  the value) and :class:`Reader` (values with transformers' defaults).

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

# PreTrainedConfig's own dataclass fields (configuration_utils.py), shared by every model type.
GENERIC_FIELDS = {
    "transformers_version": (None, INERT),
    "architectures": (None, INERT),
    "output_hidden_states": (False, INERT),
    "return_dict": (True, INERT),
    "dtype": (None, INERT),
    "chunk_size_feed_forward": (0, INERT),
    "is_encoder_decoder": (False, INERT),
    "id2label": (None, INERT),
    "label2id": (None, INERT),
    "problem_type": (None, INERT),
}
# Keys no config class declares but that transformers reads for every model type here.
GENERIC_EXTRAS = {
    "model_type": (None, COMPUTED),  # picks the architecture
    "torch_dtype": (None, INERT),  # transformers-4 name of `dtype`
    "is_causal": (True, REFUSED),  # masking_utils: False makes the causal mask bidirectional
    "quantization_config": (None, REFUSED),  # from_pretrained dequantizes / replaces layers
}


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
    """``config.json`` values with transformers' defaults for the model type."""

    def __init__(self, cfg: dict, fields: dict[str, tuple[Any, str]]):
        self.cfg, self.fields = cfg, fields

    def __call__(self, name: str) -> Any:
        return self.cfg[name] if name in self.cfg else self.fields[name][0]


def family_refusals(doc: str):
    """``(refuse, check_refused_fields)`` whose messages point to ``doc``, a family's table of
    config.json keys (e.g. ``"docs/models/gemma3.md"``)."""
    return (functools.partial(refuse, doc=doc), functools.partial(check_refused_fields, doc=doc))
