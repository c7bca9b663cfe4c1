"""A model and tokenizer from the ``model`` and ``lora`` sections of a config: the boundary
where the pipeline's config becomes :class:`jaxgrad.config.ModelSpec` and
:class:`jaxgrad.models.lora.LoraConfig`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxgrad.config import ModelSpec, as_fields
from jaxgrad.data.tokenizer import build_char_tokenizer
from jaxgrad.models.hub import FAMILIES, build_model, family_classes, load_pretrained
from jaxgrad.models.lora import LoraConfig, apply_lora


def lora_from_config(section: Any):
    """A ``LoraConfig`` from ``config.lora`` (``rank == 0`` means no adapters: returns None)."""
    fields = as_fields(section, LoraConfig, "lora")
    if int(fields.get("rank", 1)) == 0:
        return None
    targets = fields.get("target_modules")
    if targets in ("", ()):
        fields["target_modules"] = None
    return LoraConfig(**fields)


def load_model(spec: ModelSpec, lora: Any = None):
    """``(model, tokenizer)`` for a :class:`ModelSpec`; LoRA adapters when ``lora`` is given."""
    if spec.name_or_path:
        model, tokenizer = load_pretrained(spec.name_or_path, dtype=spec.dtype,
                                           param_dtype=spec.param_dtype, lora=lora,
                                           with_tokenizer=not spec.tokenizer)
    else:
        if spec.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {sorted(FAMILIES)}, got {spec.family!r}")
        if not spec.scratch:
            raise ValueError("model: give name_or_path, or the `scratch` config fields of a "
                             "from-scratch model")
        config = family_classes(spec.family)[0](**dict(spec.scratch), dtype=jnp.dtype(spec.dtype),
                                                param_dtype=jnp.dtype(spec.param_dtype))
        model, tokenizer = build_model(config, seed=spec.seed), None
        if lora is not None:
            apply_lora(model, lora)
    if spec.tokenizer == "char":
        tokenizer = build_char_tokenizer()
    elif spec.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    if tokenizer is None:
        raise ValueError(f"model {spec.name_or_path or spec.family!r} has no tokenizer; set "
                         "model.tokenizer ('char' or a tokenizer directory)")
    return model, tokenizer
