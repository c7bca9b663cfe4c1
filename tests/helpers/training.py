"""Tiny from-scratch models and data for the training tests (tests/train/, and the tests of the
final fine-tune and of the typed configs), and a fresh Python with fake CPU devices.

Models are tiny from-scratch Llama / T5 configs over jaxgrad's character tokenizer (vocabulary
103) trained on two small synthetic sources, so every run compiles in a second or two. LoRA
adapters cover every linear layer (the Llama LM head too): with a random base, adapters on the
attention projections alone barely move the near-uniform output distribution.

Multi-device runs use 8 fake CPU devices in a subprocess (``XLA_FLAGS`` must be set before jax
starts): :func:`run_subprocess`, whose code can import this module.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from helpers import REPO, TESTS
from jaxgrad.common import sharding as sharding_lib
from jaxgrad.config import MeshConfig, ModelSpec, TrainConfig
from jaxgrad.data import SyntheticSpec, synthetic_sources
from jaxgrad.models import LoraConfig
from jaxgrad.models.loading import load_model
from jaxgrad.train import fit

LLAMA = dict(vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "lm_head")
T5 = dict(vocab_size=103, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)
T5_TARGETS = ("q", "k", "v", "o", "wi", "wo")


def tiny_model(family: str = "llama", lora: bool = True, seed: int = 0):
    """``(model, tokenizer)``: a from-scratch tiny model, the same for the same seed."""
    scratch, targets = (LLAMA, LLAMA_TARGETS) if family == "llama" else (T5, T5_TARGETS)
    spec = ModelSpec(family=family, scratch=scratch, tokenizer="char", seed=seed)
    return load_model(spec, LoraConfig(rank=4, alpha=8, target_modules=targets) if lora else None)


@functools.lru_cache(maxsize=None)
def tiny_data():
    return synthetic_sources(SyntheticSpec(tasks=("add", "copy"), target="add", noisy=(),
                                           unrelated=0, n_train=32, n_validation=8, n_test=8,
                                           max_digits=2, max_chars=4))


def quick_cfg(**overrides) -> TrainConfig:
    base = dict(learning_rate=1e-2, batch_size=8, max_length=32, epochs=1, log_every=2,
                progress=False, schedule="constant")
    return TrainConfig(**{**base, **overrides})


def loss_curve(workdir: str, *, steps: int, data: int = 1, model: int = 1,
               fsdp: bool = False) -> list[float]:
    """Per-step training losses of the tiny Llama with LoRA on a (data, model) mesh."""
    d = tiny_data()
    net, tok = tiny_model("llama")
    cfg = quick_cfg(num_steps=steps, mesh=MeshConfig(data=data, model=model, fsdp=fsdp))
    losses = []
    fit(net, tok, d.examples("train"), cfg, workdir,
        callback=lambda step, m: losses.append(float(m["loss"])))
    return losses


def run_subprocess(code: str, tmp_path, devices: int = 1) -> dict:
    """Run ``code`` in a fresh Python with ``devices`` fake CPU devices; its last stdout line.
    tests/ and the repository are on its path: ``from helpers.training import tiny_model`` works."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([TESTS, REPO]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def leaves_dict(state) -> dict[str, np.ndarray]:
    return {sharding_lib.path_name(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def config_module(name: str):
    """configs/<name>.py loaded by path (configs/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                  os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
