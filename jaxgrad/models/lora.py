"""LoRA adapters by model surgery, base/adapter split, and PEFT-format import/export.

``apply_lora(model, LoraConfig(...))`` walks the model and attaches an adapter to every
:class:`~jaxgrad.models.layers.Linear` whose attribute name is one of ``target_modules`` (PEFT's
rule: the last component of the module path; ``q`` in T5 matches both self- and cross-attention,
as in PEFT). ``lora_A`` is Kaiming-uniform, ``lora_B`` zero, so the adapted model computes exactly
what the base did; the update is ``(alpha / r) · B A``.

Adapter weights are ``nnx.LoRAParam`` variables, so the standard NNX filters separate them:
``graphdef, adapters, base = split_lora(model)`` and ``merge_lora(graphdef, adapters, base)``.
The adapter state is what meta-training optimises and what per-sample gradients differentiate.

PEFT interchange: :func:`save_peft_adapter` writes ``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's key names (``base_model.model.<module path>.lora_A
.weight``) so ``peft.PeftModel.from_pretrained`` loads our adapters onto the torch model, and
:func:`load_peft_adapter` reads adapters trained with peft.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.models.layers import Linear

DEFAULT_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj"),
    "t5": ("q", "k", "v"),
}
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters.

    Attributes:
      rank: r, the adapter rank.
      alpha: scaling numerator; the update is (alpha / rank) · B A.
      dropout: dropout on the adapter input during training (0 disables).
      target_modules: attribute names of the linear layers to adapt; None = the paper's defaults
        (``q,k,v`` for T5, ``q_proj,k_proj,v_proj`` for Llama). Add ``o`` / ``o_proj`` or MLP
        names (``gate_proj``, ``up_proj``, ``down_proj``; ``wi``, ``wi_0``, ``wi_1``, ``wo``) freely.
      seed: seed of the ``lora_A`` initialisation.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if int(self.rank) <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(
                t.strip() for t in self.target_modules.split(",") if t.strip()))
        elif self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return float(self.alpha) / float(self.rank)


def model_family(model: nnx.Module) -> str:
    return "t5" if getattr(model, "is_encoder_decoder", False) else "llama"


def resolve_targets(model: nnx.Module, cfg: LoraConfig) -> tuple[str, ...]:
    return tuple(cfg.target_modules) if cfg.target_modules else DEFAULT_TARGETS[model_family(model)]


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
    """Every :class:`Linear` in ``model`` by dotted module path."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear)}


def apply_lora(model: nnx.Module, cfg: LoraConfig) -> nnx.Module:
    """Attach LoRA adapters in place to the target linear layers; returns ``model``.

    Raises:
      ValueError: a target name matches no linear layer of the model (the message lists the
        names that exist), or the model already has adapters.
    """
    targets = resolve_targets(model, cfg)
    linears = linear_modules(model)
    available = sorted({path.rsplit(".", 1)[-1] for path in linears})
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ValueError(f"LoRA target_modules {unknown} match no linear layer of this "
                         f"{type(model).__name__}; available names: {available}")
    rngs = nnx.Rngs(params=cfg.seed)
    for path in sorted(linears):
        lin = linears[path]
        if path.rsplit(".", 1)[-1] in targets:
            if lin.lora_A is not None:
                raise ValueError(f"apply_lora: {path} already has a LoRA adapter")
            lin.add_lora(cfg.rank, cfg.alpha, cfg.dropout, rngs)
    return model


def split_lora(model: nnx.Module):
    """``(graphdef, adapters, base)``: adapter state (``nnx.LoRAParam``) and everything else."""
    return nnx.split(model, nnx.LoRAParam, ...)


def merge_lora(graphdef, adapters, base) -> nnx.Module:
    return nnx.merge(graphdef, adapters, base)


def lora_state(model: nnx.Module) -> nnx.State:
    return nnx.state(model, nnx.LoRAParam)


def num_params(state_or_model: Any) -> int:
    """Number of scalars in a model or state (e.g. ``num_params(lora_state(model))``)."""
    state = nnx.state(state_or_model) if isinstance(state_or_model, nnx.Module) else state_or_model
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(state)))


def trainable_summary(model: nnx.Module) -> dict[str, int | float]:
    lora = num_params(lora_state(model))
    total = num_params(model)
    return {"lora_params": lora, "total_params": total, "lora_fraction": lora / max(total, 1)}


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """Adapter weights under PEFT key names, as float32 numpy arrays."""
    out = {}
    for path, lin in linear_modules(model).items():
        if lin.lora_A is not None:
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = np.asarray(lin.lora_A[...], np.float32)
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = np.asarray(lin.lora_B[...], np.float32)
    return out


def lora_config_of(model: nnx.Module) -> LoraConfig:
    """The LoraConfig describing the adapters present on ``model`` (rank, alpha, targets)."""
    adapted = {p: l for p, l in linear_modules(model).items() if l.lora_A is not None}
    if not adapted:
        raise ValueError("model has no LoRA adapters (call apply_lora first)")
    first = next(iter(adapted.values()))
    rank = int(first.lora_A.shape[0])
    targets = tuple(sorted({p.rsplit(".", 1)[-1] for p in adapted}))
    return LoraConfig(rank=rank, alpha=first.lora_scaling * rank, dropout=first.lora_dropout,
                      target_modules=targets)


def save_peft_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format."""
    from safetensors.numpy import save_file

    cfg = lora_config_of(model)
    os.makedirs(directory, exist_ok=True)
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if model_family(model) == "t5" else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2)
    save_file(adapter_tensors(model), os.path.join(directory, "adapter_model.safetensors"))


def read_peft_config(directory: str | os.PathLike) -> LoraConfig:
    path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PEFT adapter config at {path}")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    for key in ("use_rslora", "use_dora"):
        if raw.get(key):
            raise ValueError(f"{path}: {key}=true is not supported (plain LoRA only)")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules given as a regex ({targets!r}); "
                         "only a list of module names is supported")
    return LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                      dropout=float(raw.get("lora_dropout", 0.0)),
                      target_modules=tuple(targets) if targets else None)


def load_peft_adapter(model: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """Attach (if needed) and fill adapters from a PEFT directory; returns ``model``.

    Raises:
      ValueError: adapter tensors that the model has no place for, adapter layers the file does
        not cover, or mis-shaped tensors (each listed).
    """
    from safetensors.numpy import load_file

    cfg = read_peft_config(directory)
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PEFT adapter weights at {path}")
    tensors = load_file(path)
    if not any(l.lora_A is not None for l in linear_modules(model).values()):
        apply_lora(model, cfg)
    ours = {}
    for p, lin in linear_modules(model).items():
        if lin.lora_A is not None:
            lin.lora_scaling = cfg.scaling
            ours[f"{PEFT_PREFIX}{p}.lora_A.weight"] = lin.lora_A
            ours[f"{PEFT_PREFIX}{p}.lora_B.weight"] = lin.lora_B
    # peft may save keys with the adapter name ("...lora_A.default.weight"); normalise.
    norm = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
            for k, v in tensors.items()}
    unexpected = sorted(set(norm) - set(ours))
    missing = sorted(set(ours) - set(norm))
    if unexpected or missing:
        raise ValueError(f"{path}: adapter tensors do not match the model; unexpected: "
                         f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; missing: "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    bad = [f"{k}: file {norm[k].shape} vs model {tuple(v.shape)}" for k, v in ours.items()
           if tuple(norm[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{path}: mis-shaped adapter tensors: {bad}")
    for k, var in ours.items():
        var[...] = jnp.asarray(norm[k], var[...].dtype)
    return model
