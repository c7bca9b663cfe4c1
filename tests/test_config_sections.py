"""One source of defaults (issue 17): a config section that a dataclass or function reads has no
defaults of its own. ``default_config()`` builds it from the dataclass's field defaults (or the
function's keyword defaults), so the config and the library cannot disagree again."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib

import pytest

from jaxgrad import config_sections, fidelity, train
from jaxgrad.config_sections import LORA_PEFT_ONLY, default_config, files_section
from jaxgrad.data.sources import SourcesSpec
from jaxgrad.fidelity import FidelityConfig
from jaxgrad.gradients import compute_gradient_store
from jaxgrad.groups import GroupsSpec
from jaxgrad.models.lora import LoraConfig
from jaxgrad.train import MeshConfig, ModelSpec, TrainConfig, lora_from_config

# section -> (the dataclass that reads it, its fields the section leaves out)
DATACLASS_SECTIONS = {
    "model": (ModelSpec, ()),
    "lora": (LoraConfig, LORA_PEFT_ONLY),
    "train": (TrainConfig, ("mesh",)),
    "mesh": (MeshConfig, ()),
    "groups": (GroupsSpec, ()),
    "fidelity": (FidelityConfig, ()),
}
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


def test_one_optimizers_tuple():
    assert fidelity.OPTIMIZERS is train.OPTIMIZERS


def _literal_keys(tree: ast.AST) -> set[tuple[str, str]]:
    """``(section, key)`` of every ``c.<section>.<key> = <literal>`` (and ``f.<key>`` in
    fidelity_section) in config_sections.py."""
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, (ast.Constant, ast.Tuple,
                                                                          ast.Dict, ast.UnaryOp))):
            continue
        for target in node.targets:
            parts = ast.unparse(target).split(".")
            if parts[0] == "c" and len(parts) == 3:
                found.add((parts[1], parts[2]))
            elif parts[0] == "f" and len(parts) == 2:
                found.add(("fidelity", parts[1]))
    return found


def test_each_default_is_declared_once():
    """config_sections.py assigns no value to a key whose default a dataclass declares (fidelity:
    the other way round, FidelityConfig's defaults are the section's), nor to the gradients keys
    that compute_gradient_store declares."""
    literals = _literal_keys(ast.parse(pathlib.Path(config_sections.__file__).read_text()))
    twice = sorted(k for k in literals
                   if (k[0] in DATACLASS_SECTIONS and k[0] != "fidelity")
                   or (k[0] == "gradients" and k[1] in GRADIENT_STORE_KEYS))
    assert not twice, f"declared in config_sections.py and in a dataclass or function: {twice}"
    assert {k for s, k in literals if s == "fidelity"} == {f.name for f in dataclasses.fields(
        FidelityConfig)}
    source = ast.parse(inspect.getsource(FidelityConfig))
    own = [ast.unparse(n) for n in ast.walk(source)
           if isinstance(n, ast.AnnAssign) and isinstance(n.value, ast.Constant)]
    assert not own, f"FidelityConfig declares defaults of its own: {own}"
