"""jaxgrad/config.py: the config's sections, their typed forms and their checks.

One source of defaults (issue 17): every section's defaults are declared in jaxgrad/config.py.
A section that a dataclass or function reads has no defaults of its own: ``default_config()``
builds it from the field defaults of a dataclass declared in jaxgrad/config.py, and the library
reads the same dataclass (or subclasses it without adding fields, or takes its keyword defaults
from it), so the config and the library cannot disagree again.

Also: the typed configs (TrainConfig, ModelSpec, ...) refuse bad values by name, every shipped
config and variant converts to them, and the name lists and count fields read from a command
line as from Python."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo
from helpers import REPO
from helpers.training import config_module, tiny_model
from jaxgrad import config
from jaxgrad.config import (LORA_PEFT_ONLY, NAME_LISTS, OPTIMIZERS, FidelityConfig, GradientsConfig,
                            GroupsSection, LoraSection, MeshConfig, ModelSpec, TrainConfig,
                            default_config, files_section)
from jaxgrad.data.sources import SourcesSpec
from jaxgrad.gradients.compute import compute_gradient_store
from jaxgrad.groups.units import GroupsSpec
from jaxgrad.models import LoraConfig
from jaxgrad.models.loading import lora_from_config
from jaxgrad.models.lora import split_trainable
from jaxgrad.pipeline import check_method_sections
from jaxgrad.pipeline.fingerprint import flatten_config


JAXGRAD = pathlib.Path(config.__file__).parent

# section -> (the dataclass that reads it, its fields the section leaves out)
DATACLASS_SECTIONS = {
    "model": (ModelSpec, ()),
    "lora": (LoraConfig, LORA_PEFT_ONLY),
    "train": (TrainConfig, ("mesh",)),
    "mesh": (MeshConfig, ()),
    "groups": (GroupsSpec, ()),
    "fidelity": (FidelityConfig, ()),
    "gradients": (GradientsConfig, ()),
}
# Library classes that add checks and behaviour to a section's declaration in jaxgrad/config.py.
SUBCLASSES = {LoraConfig: LoraSection, GroupsSpec: GroupsSection}
# The gradients keys compute_gradient_store takes as keyword arguments.
GRADIENT_STORE_KEYS = ("output_fn", "eps", "batch_size", "chunk_size", "shard_size", "dtype")
# A default a config spells otherwise ("" for None: a command line can set a string).
CONFIG_SPELLING = {("lora", "target_modules"): ("", None)}


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING \
        else field.default


def _same(a, b) -> bool:
    """Equal and of the same type: ml_collections fixes a key's type from its first value, so an
    int default where the config held a float would refuse ``--config.x=0.5``."""
    if hasattr(a, "to_dict"):
        a = a.to_dict()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("section", sorted(DATACLASS_SECTIONS))
def test_section_defaults_are_the_dataclass_defaults(section):
    cls, exclude = DATACLASS_SECTIONS[section]
    config = default_config()[section]
    fields = [f for f in dataclasses.fields(cls) if f.name not in exclude]
    assert set(config.keys()) == {f.name for f in fields}
    for f in fields:
        value, want = config[f.name], _default(f)
        spelled = CONFIG_SPELLING.get((section, f.name))
        if spelled is not None:
            assert (value, want) == spelled, f.name
        else:
            assert _same(value, want), f"config.{section}.{f.name} = {value!r}, {cls.__name__}: {want!r}"


def test_default_config_reads_as_the_library_defaults():
    """What the pipeline builds from the default config is what a library caller gets."""
    c = default_config()
    assert TrainConfig.from_config(c.train, c.mesh) == TrainConfig()
    assert ModelSpec.from_config(c.model) == ModelSpec()
    assert lora_from_config(c.lora) == LoraConfig()
    assert GroupsSpec.from_config(c.groups) == GroupsSpec()
    assert FidelityConfig(**c.fidelity) == FidelityConfig()
    assert (TrainConfig().schedule, TrainConfig().batch_size, TrainConfig().max_length) == (
        "linear", 32, 256)
    assert (LoraConfig().rank, LoraConfig().alpha) == (16, 32.0)


def test_gradients_section_is_compute_gradient_store_defaults():
    c = default_config()
    store = {p.name: p.default for p in inspect.signature(compute_gradient_store).parameters.values()}
    for key in GRADIENT_STORE_KEYS:
        assert _same(c.gradients[key], store[key]), key
    assert _same(c.train.max_length, store["max_length"])  # the stage passes train.max_length
    assert store["shard_size"] == 1024 and store["max_length"] == TrainConfig.max_length == 256


def test_files_section_splits_are_sources_spec_defaults():
    files = files_section()
    assert (files.validation, files.test) == (SourcesSpec.validation, SourcesSpec.test)
    assert isinstance(files.validation, float) and isinstance(files.test, float)


def test_library_classes_declare_no_fields_of_their_own():
    """LoraConfig and GroupsSpec check and use a section; its fields and defaults are config's."""
    for cls, section in SUBCLASSES.items():
        assert issubclass(cls, section)
        assert dataclasses.fields(cls) == dataclasses.fields(section), cls.__name__
        own = [ast.unparse(n) for n in ast.walk(ast.parse(inspect.getsource(cls).lstrip()))
               if isinstance(n, ast.AnnAssign)]
        assert not own, f"{cls.__name__} declares fields of its own: {own}"


def test_one_optimizers_tuple():
    """Declared once (jaxgrad/config.py), and both sections that choose an optimizer accept it."""
    defined = [p for p in JAXGRAD.rglob("*.py")
               for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.Assign) and "OPTIMIZERS" in map(ast.unparse, n.targets)]
    assert [p.relative_to(JAXGRAD) for p in defined] == [pathlib.Path("config.py")]
    for name in OPTIMIZERS:
        assert TrainConfig(optimizer=name).optimizer == FidelityConfig(optimizer=name).optimizer
    for cls in (TrainConfig, FidelityConfig):
        with pytest.raises(ValueError):
            cls(optimizer="lion")


def _literal_keys(tree: ast.AST) -> set[tuple[str, str]]:
    """``(section, key)`` of every ``c.<section>.<key> = <literal>`` in jaxgrad/config.py."""
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, (ast.Constant, ast.Tuple,
                                                                          ast.Dict, ast.UnaryOp))):
            continue
        for target in node.targets:
            parts = ast.unparse(target).split(".")
            if parts[0] == "c" and len(parts) == 3:
                found.add((parts[1], parts[2]))
    return found


def test_each_default_is_declared_once():
    """jaxgrad/config.py assigns no value to a key of a section built from a dataclass, and
    compute_gradient_store takes its gradients keys' defaults from GradientsConfig (no literal)."""
    literals = _literal_keys(ast.parse(pathlib.Path(config.__file__).read_text()))
    twice = sorted(k for k in literals if k[0] in DATACLASS_SECTIONS)
    assert not twice, f"declared in default_config() and in a dataclass: {twice}"
    fn = ast.parse(inspect.getsource(compute_gradient_store)).body[0]
    args = fn.args.kwonlyargs
    defaults = {a.arg: ast.unparse(d) for a, d in zip(args, fn.args.kw_defaults) if d is not None}
    for key in GRADIENT_STORE_KEYS:
        assert defaults[key] == f"GradientsConfig.{key}", (key, defaults[key])


def test_option_values_are_declared_once():
    """The allowed values of every option key live in jaxgrad/config.py: no other module spells
    one of those tuples again (a second copy is how two lists of outputs or optimizers drifted)."""
    options = {name: value for name, value in vars(config).items()
               if name.isupper() and isinstance(value, tuple) and value
               and all(isinstance(v, str) for v in value)}
    assert set(config.CHOICES.values()) <= set(options.values())
    copies = []
    for path in JAXGRAD.rglob("*.py"):
        if path.name == "config.py" and path.parent == JAXGRAD:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                copies += [f"{path.relative_to(JAXGRAD)}:{node.lineno} = config.{name}"
                           for name, v in options.items() if v == value]
    assert not copies, copies


def test_option_defaults_are_allowed_values():
    c = default_config()
    for key, allowed in config.CHOICES.items():
        section, name = key.split(".")
        assert c[section][name] in allowed, (key, c[section][name], allowed)
    assert tuple(c.pipeline.finetune_runs) == config.FINETUNE_RUNS


# ------------------------------------------------------------------------------------------------
# Values from a config file and the command line; the typed configs


def test_config_file_counts_take_a_fraction_from_the_command_line():
    """configs/smollm2_bigbench.py writes validation=100 (a count); ml_collections would lock the
    field to int and refuse --config.data.files.validation=0.1 (files_section holds floats)."""
    argv = ["prog", f"--config={os.path.join(REPO, 'configs', 'smollm2_bigbench.py')}",
            "--config.data.files.validation=0.1", "--config.data.files.test=30"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
    fv(argv)
    assert fv.config.data.files.validation == 0.1 and fv.config.data.files.test == 30


def test_name_lists_are_keys_of_the_default_config():
    flat = flatten_config(demo.get_config())
    missing = [k for k in NAME_LISTS if k not in flat]
    assert not missing, f"NAME_LISTS names keys the config does not have: {missing}"


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exponential")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(batch_size=6, grad_accum_steps=4)
    with pytest.raises(ValueError, match="unknown keys.*learning_rat"):
        TrainConfig.from_config({"learning_rat": 1e-3})
    cfg = TrainConfig.from_config({"learning_rate": 1e-3, "batch_size": 4},
                                  {"data": 2, "model": 1, "fsdp": True, "rules": None})
    assert cfg.mesh == MeshConfig(data=2, model=1, fsdp=True) and cfg.batch_size == 4
    model, _ = tiny_model(lora=False)
    with pytest.raises(ValueError, match="LoRA adapters"):
        split_trainable(model)


@pytest.mark.parametrize("name,variants", [("demo", (None, "tiny")),
                                           ("llama_alpaca", (None, "bf16")),
                                           ("t5_cot", (None, "bf16"))])
def test_configs_convert_to_typed_configs(name, variants):
    """Every config file and variant yields valid TrainConfig / ModelSpec / LoraConfig and sets
    only keys its sections define (the check run_pipeline makes before the first stage; that it
    refuses a misspelt key is tested in tests/pipeline/test_validate.py)."""
    from jaxgrad.models.loading import lora_from_config

    module = config_module(name)
    for variant in variants:
        c = module.get_config(variant)
        cfg = TrainConfig.from_config(c.train, c.mesh)
        spec = ModelSpec.from_config(c.model)
        lora = lora_from_config(c.lora)
        assert cfg.batch_size % cfg.grad_accum_steps == 0 and lora.rank > 0
        assert spec.name_or_path or spec.scratch, f"{name}:{variant} names no model"
        assert set(c) >= {"model", "lora", "data", "train", "mesh", "finetune"}
        check_method_sections(c)  # raises, naming them, on keys no section defines
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("nope")
