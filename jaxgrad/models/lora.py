r"""LoRA adapters by model surgery, and the base/adapter split.

Which layers get an adapter
---------------------------
``apply_lora(model, LoraConfig(...))`` attaches an adapter to every
:class:`~jaxgrad.models.layers.Linear` whose dotted module path (the Hugging Face name, e.g.
``model.layers.0.self_attn.q_proj``) peft would select (peft ``check_target_module_exists``):

- ``exclude_modules`` (names, the rule below) or ``exclude_regex`` (``re.fullmatch``) drop a path.
- ``target_modules`` names: a name selects the path equal to it or ending in ``"." + name``, so
  ``q_proj``, ``self_attn.q_proj`` and ``model.layers.0.self_attn.q_proj`` all work, and ``q`` in
  T5 matches self- and cross-attention. ``None``: the paper's defaults, the attention's q, k, v
  (the model class's ``LORA_TARGETS``: ``q_proj, k_proj, v_proj``; T5 ``q, k, v``; the fused
  ``c_attn`` of GPT-2 and ``query_key_value`` of GPT-NeoX).
  ``("all-linear",)``: every linear layer but the output head ``lm_head``.
- ``target_regex``: peft's *string* ``target_modules``, ``re.fullmatch`` over the full path.
- ``layers_to_transform``: keep a suffix-matched path only if its layer index (the number after
  the first ``.<layers_pattern>.`` of the path; after the first ``.<anything>.`` when
  ``layers_pattern`` is empty) is listed. As in peft, a name equal to the full path is kept.
- ``rank_pattern`` / ``alpha_pattern``: ordered ``(key, value)`` pairs; the first ``key`` with
  ``re.match(rf"(.*\.)?({key})$", path)`` gives that module's rank / alpha (peft ``get_pattern_key``).

The update is ``scaling · B A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``), per module. ``lora_A`` is Kaiming-uniform and ``lora_B`` zero (peft's
``init_lora_weights=True``), so a new adapter computes exactly what the base model did.

Adapter weights are ``nnx.LoRAParam`` variables, so the standard NNX filters separate them:
``graphdef, adapters, base = split_lora(model)`` and ``merge_lora(graphdef, adapters, base)``.
The adapter state is what meta-training optimises and what per-sample gradients differentiate.

PEFT files (``adapter_config.json`` + ``adapter_model.safetensors``), written and read with
peft's rules: :mod:`jaxgrad.models.peft`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxgrad._compat import moved_names
from jaxgrad.common.checks import as_names  # noqa: F401  (models.peft imports it from here)
from jaxgrad.config import LoraSection
from jaxgrad.models.layers import Linear, lora_scaling

ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"


def as_pairs(value, cast) -> tuple[tuple[str, Any], ...]:
    """A mapping (or sequence of pairs) -> ordered ``(str key, cast(value))`` pairs."""
    items = value.items() if hasattr(value, "items") else (value or ())
    return tuple((str(k), cast(v)) for k, v in items)


def is_off(value) -> bool:
    """Whether a config value leaves its feature off: null, false or empty."""
    return value is None or value is False or (isinstance(value, (str, list, dict, tuple)) and not value)


@dataclasses.dataclass(frozen=True)
class LoraConfig(LoraSection):
    r"""LoRA hyper-parameters (peft's fields jaxgrad honours, same rules); the config's ``lora``.

    The fields and their defaults are declared by :class:`jaxgrad.config.LoraSection` (the one
    source of the ``lora`` section's defaults); this class adds their checks and peft's rules.

    Attributes:
      rank: r, the adapter rank (default for modules ``rank_pattern`` does not name).
      alpha: scaling numerator; the update is (alpha / rank) · B A (alpha / sqrt(rank) with
        ``use_rslora``).
      dropout: dropout on the adapter input during training (0 disables).
      target_modules: names of the linear layers to adapt (a comma-separated string is split): a
        name matches the path equal to it or ending in ``"." + name``; None = the paper's defaults
        (``q,k,v`` for T5, ``q_proj,k_proj,v_proj`` for Llama); ``("all-linear",)`` = every linear
        layer but ``lm_head``.
      seed: seed of the ``lora_A`` initialisation.
      target_regex: instead of ``target_modules``: a regex, ``re.fullmatch`` over the full path.
      exclude_modules / exclude_regex: paths never adapted (names as above / fullmatch regex).
      layers_to_transform: layer indices to adapt (suffix-matched names only, as in peft).
      layers_pattern: names of the layer lists (``layers``, ``block``) where the index is read.
      rank_pattern / alpha_pattern: ``{key: rank}`` / ``{key: alpha}``, first key with
        ``re.match(rf"(.*\.)?({key})$", path)`` wins; stored as ordered pairs.
      use_rslora: scaling ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.

    Raises:
      ValueError: non-positive rank, dropout outside [0, 1), or a combination peft refuses
        (both target forms, ``layers_*`` with a regex or all-linear, ``layers_pattern`` alone).
    """

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("target_modules", as_names(self.target_modules) or None)
        put("target_regex", self.target_regex or None)  # "" (an unset config string): none
        put("exclude_regex", self.exclude_regex or None)
        put("exclude_modules", as_names(self.exclude_modules) or None)
        put("layers_pattern", as_names(self.layers_pattern) or None)
        layers = self.layers_to_transform
        put("layers_to_transform", None if layers is None else
            (int(layers),) if isinstance(layers, int) else tuple(int(i) for i in layers) or None)
        put("rank_pattern", as_pairs(self.rank_pattern, int))
        put("alpha_pattern", as_pairs(self.alpha_pattern, float))
        put("use_rslora", bool(self.use_rslora))
        if int(self.rank) <= 0 or any(r <= 0 for _, r in self.rank_pattern):
            raise ValueError(f"LoraConfig: ranks must be positive integers, got rank={self.rank!r}, "
                             f"rank_pattern={dict(self.rank_pattern)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_regex is not None and self.target_modules is not None:
            raise ValueError("LoraConfig: give target_modules (names) or target_regex, not both")
        whole = self.target_regex is not None or self.all_linear
        if whole and (self.layers_to_transform or self.layers_pattern):
            raise ValueError("LoraConfig: layers_to_transform / layers_pattern cannot be used with "
                             "target_regex or all-linear (peft refuses the same)")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("LoraConfig: layers_pattern needs layers_to_transform")

    @property
    def all_linear(self) -> bool:
        return self.target_modules is not None and [t.lower() for t in self.target_modules] == [ALL_LINEAR]

    @property
    def scaling(self) -> float:
        """The scaling of a module at the default rank and alpha."""
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def rank_for(self, path: str) -> int:
        return int(_pattern_value(self.rank_pattern, path, self.rank))

    def alpha_for(self, path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, path, self.alpha))

    def selects(self, path: str, targets: tuple[str, ...] | None = None,
                modules_to_save: tuple[str, ...] = (), head: str = OUTPUT_HEAD) -> bool:
        """Whether the module at ``path`` gets an adapter, by peft's rules (module docstring).

        ``targets`` replaces ``target_modules`` (:func:`select_modules` passes the family's
        defaults when it is None); ``modules_to_save`` names modules peft keeps whole, which are
        never adapted; ``head`` is the output head's path, which "all-linear" leaves out.
        """
        if self.exclude_regex is not None and re.fullmatch(self.exclude_regex, path):
            return False
        if self.exclude_modules and _name_matches(self.exclude_modules, path):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save):
            return False
        if self.target_regex is not None:
            return re.fullmatch(self.target_regex, path) is not None
        targets = (self.target_modules or ()) if targets is None else targets
        if [t.lower() for t in targets] == [ALL_LINEAR]:
            return path != head
        if path in targets:
            return True
        if not _name_matches(targets, path):
            return False
        if not self.layers_to_transform:
            return True
        index = _layer_index(path, self.layers_pattern)
        return index is not None and index in self.layers_to_transform


def _name_matches(names, path: str) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _layer_index(path: str, patterns: tuple[str, ...] | None) -> int | None:
    """peft's layer index of a module path: the first number after ``.<pattern>.``."""
    for pattern in patterns or (None,):
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\." if pattern is None else
                     rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
        if m:
            return int(m.group("idx"))
    return None


def _pattern_value(pattern, path: str, default):
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _family_attr(model: nnx.Module, name: str):
    value = getattr(type(model), name, None)
    if value is None:
        raise TypeError(f"{type(model).__name__} declares no {name} (a jaxgrad model class "
                        "names its LoRA defaults: LORA_TARGETS, PEFT_TARGETS, OUTPUT_HEAD)")
    return value


def default_targets(model: nnx.Module, *, peft: bool = False) -> tuple[str, ...]:
    """The model family's default ``target_modules``: jaxgrad's (the paper's q, k, v) or, with
    ``peft=True``, peft's own (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``)."""
    return tuple(_family_attr(model, "PEFT_TARGETS" if peft else "LORA_TARGETS"))


def output_head(model: nnx.Module) -> str:
    """Module path of the output head ("all-linear" leaves it out): ``lm_head``, ``embed_out``."""
    return str(_family_attr(model, "OUTPUT_HEAD"))


def resolve_targets(model: nnx.Module, cfg: LoraConfig) -> tuple[str, ...]:
    return tuple(cfg.target_modules) if cfg.target_modules else default_targets(model)


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
    """Every :class:`Linear` in ``model`` by dotted module path."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear)}


def select_modules(model: nnx.Module, cfg: LoraConfig, *, strict: bool = True,
                   modules_to_save: tuple[str, ...] = (),
                   targets: tuple[str, ...] | None = None) -> dict[str, Linear]:
    """The linear layers ``cfg`` adapts, by path (sorted).

    Raises:
      ValueError: nothing is selected; with ``strict``, also a target name that matches no
        linear layer (the message lists the names that exist).
    """
    linears = linear_modules(model)
    if targets is None and cfg.target_regex is None:
        targets = resolve_targets(model, cfg)
    if strict and cfg.target_regex is None and not cfg.all_linear:
        unknown = [t for t in targets if not any(_name_matches((t,), p) for p in linears)]
        if unknown:
            available = sorted({p.rsplit(".", 1)[-1] for p in linears})
            raise ValueError(f"LoRA target_modules {unknown} match no linear layer of this "
                             f"{type(model).__name__}; available names: {available}")
    chosen = {p: linears[p] for p in sorted(linears)
              if cfg.selects(p, targets, modules_to_save, output_head(model))}
    if not chosen:
        what = (f"target_regex {cfg.target_regex!r}" if cfg.target_regex is not None
                else f"target_modules {list(targets)}")
        raise ValueError(f"LoRA {what} (with exclude_modules={cfg.exclude_modules}, "
                         f"exclude_regex={cfg.exclude_regex!r}, layers_to_transform="
                         f"{cfg.layers_to_transform}) select no linear layer of this "
                         f"{type(model).__name__}")
    return chosen


def apply_lora(model: nnx.Module, cfg: LoraConfig) -> nnx.Module:
    """Attach LoRA adapters in place to the linear layers ``cfg`` selects; returns ``model``.

    Ranks and alphas are per module (``rank_pattern`` / ``alpha_pattern``); ``lora_A [r, in]`` and
    ``lora_B [out, r]`` are float32. Selection and initialisation follow peft's ``LoraConfig``
    (module docstring).

    Args:
      model: an NNX model of a supported family (its linear layers are ``layers.Linear``).
      cfg: the :class:`LoraConfig` (rank, alpha, targets, patterns, dropout, seed).

    Returns:
      ``model`` itself, modified in place.

    Raises:
      ValueError: a target name matches no linear layer (the message lists the names that exist),
        nothing is selected, or the model already has adapters.
    """
    attach_adapters(model, cfg, select_modules(model, cfg))
    return model


def attach_adapters(model: nnx.Module, cfg: LoraConfig, chosen: dict[str, Linear]) -> None:
    """Give each ``chosen`` layer (path -> Linear, from :func:`select_modules`) a fresh adapter
    with its rank / alpha (``rank_pattern`` / ``alpha_pattern``); raises on a layer that has one."""
    rngs = nnx.Rngs(params=cfg.seed)
    for path, lin in chosen.items():
        if lin.lora_A is not None:
            raise ValueError(f"apply_lora: {path} already has a LoRA adapter")
        lin.add_lora(cfg.rank_for(path), cfg.alpha_for(path), cfg.dropout, rngs,
                     use_rslora=cfg.use_rslora)


def split_lora(model: nnx.Module):
    """``(graphdef, adapters, base)``: adapter state (``nnx.LoRAParam``) and everything else.

    Args:
      model: an NNX model with LoRA adapters (:func:`apply_lora`).

    Returns:
      ``nnx.split``'s ``(GraphDef, State, State)``; :func:`merge_lora` inverts it.

    Raises:
      ValueError: the model has no adapters (:func:`trainable_filter`).
    """
    return split_trainable(model, full_finetune=False)


# What a training run trains, by the name recorded in its checkpoints' ``meta["trainable"]``.
TRAINABLE_FILTERS = {"lora": nnx.LoRAParam, "full": nnx.Param}


def trainable_kind(full_finetune: bool = False) -> str:
    """``"full"`` (every parameter) or ``"lora"`` (the adapters): the key of ``TRAINABLE_FILTERS``."""
    return "full" if full_finetune else "lora"


def has_adapters(model: nnx.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (any ``nnx.LoRAParam``)."""
    return bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def trainable_filter(model: nnx.Module, full_finetune: bool = False):
    """The NNX filter of what is trained and differentiated: ``nnx.Param`` (every parameter)
    under full fine-tuning, else ``nnx.LoRAParam`` (the adapters). The one trainable split of
    jaxgrad: training, per-sample gradients, the estimates and fidelity all go through it.

    Raises:
      ValueError: LoRA mode on a model without adapters (never a silent fall-back to every
        parameter).
    """
    kind = trainable_kind(full_finetune)
    if kind == "lora" and not has_adapters(model):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters, and LoRA mode "
                         "(full_finetune=False) trains and differentiates only those: set "
                         "train.full_finetune=True to use every parameter, or give the model "
                         "adapters (lora.rank > 0 in the config; apply_lora / "
                         "load_pretrained(lora=...))")
    return TRAINABLE_FILTERS[kind]


def trainable_state(model: nnx.Module, full_finetune: bool = False) -> nnx.State:
    """The trainable parameters θ (:func:`trainable_filter`); raises as it does."""
    return nnx.state(model, trainable_filter(model, full_finetune))


def split_trainable(model: nnx.Module, full_finetune: bool = False):
    """``(graphdef, trainable, frozen)`` by :func:`trainable_filter` (LoRA adapters vs the rest,
    or every Param vs the rest); raises as it does."""
    return nnx.split(model, trainable_filter(model, full_finetune), ...)


def merge_lora(graphdef, adapters, base) -> nnx.Module:
    """Rebuild a model from :func:`split_lora`'s parts (``nnx.merge``), the inverse of the split.

    It does not fold ``scaling · B A`` into the base weights (peft's ``merge_and_unload``): the
    adapters stay separate ``nnx.LoRAParam`` variables.

    Args:
      graphdef: the ``nnx.GraphDef`` of the split.
      adapters: the adapter ``nnx.State`` (e.g. trained values of the same structure).
      base: the ``nnx.State`` of everything else.

    Returns:
      A new ``nnx.Module`` holding those states.
    """
    return nnx.merge(graphdef, adapters, base)


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapters' state (empty when the model has none).

    Args:
      model: an NNX model.

    Returns:
      The ``nnx.State`` of its ``nnx.LoRAParam`` variables (``lora_A [r, in]``, ``lora_B [out,
      r]``, float32).
    """
    return nnx.state(model, nnx.LoRAParam)


def num_params(state_or_model: Any) -> int:
    """Number of scalars in a model or state (e.g. ``num_params(lora_state(model))``).

    Args:
      state_or_model: an ``nnx.Module`` (all its state, parameters and others) or any pytree of
        arrays (an ``nnx.State``).

    Returns:
      The total element count, an int (elements, not bytes).
    """
    state = nnx.state(state_or_model) if isinstance(state_or_model, nnx.Module) else state_or_model
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(state)))


def trainable_summary(model: nnx.Module) -> dict[str, int | float]:
    """How much of ``model`` the adapters are.

    Args:
      model: an NNX model, with or without adapters.

    Returns:
      ``{"lora_params": int, "total_params": int (all state, adapters included),
      "lora_fraction": float in [0, 1]}`` (:func:`num_params` counts).
    """
    lora = num_params(lora_state(model))
    total = num_params(model)
    return {"lora_params": lora, "total_params": total, "lora_fraction": lora / max(total, 1)}


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
