"""Import paths of jaxgrad 0.1 that the package layout moved still work, with a warning.

Every entry of ``jaxgrad._compat.MOVED`` is imported the way old code did (``from old import
name``, in a fresh interpreter for the modules that no longer exist) and must give the very object
its new home holds, with a DeprecationWarning naming that home. The field reports' scripts were
written against these paths.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

from jaxgrad import _compat

ENTRIES = sorted((old, name) for old, names in _compat.MOVED.items() for name in names)


@pytest.mark.parametrize("old,name", ENTRIES, ids=[f"{o}.{n}" for o, n in ENTRIES])
def test_old_path_gives_the_moved_object_with_a_warning(old, name):
    module, new_name = _compat.new_home(old, name)
    want = getattr(importlib.import_module(module), new_name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_module = importlib.import_module(old)
        got = getattr(old_module, name)
    assert got is want, f"{old}.{name} is not {module}.{new_name}"
    if name not in vars(old_module):  # served by the forwarding, not imported there for its use
        messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
        assert any(module in m for m in messages), (old, name, messages)


@pytest.mark.parametrize("old,name", ENTRIES, ids=[f"{o}.{n}" for o, n in ENTRIES])
def test_the_warning_points_at_the_users_line(old, name):
    """Python shows a DeprecationWarning by default only when it is attributed to the user's own
    code (``__main__``): the warning must name the line that used the old path, not a line of
    jaxgrad (the packages with lazy exports forward through one more function)."""
    code = compile(f"import importlib\ngetattr(importlib.import_module({old!r}), {name!r})\n",
                   "user_code.py", "exec")
    importlib.import_module(old)  # a removed module warns on import; the name's use is checked
    if name in vars(sys.modules[old]):  # imported there for its own use: no forwarding
        module, new_name = _compat.new_home(old, name)
        assert vars(sys.modules[old])[name] is getattr(importlib.import_module(module), new_name)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(code, {})
    where = [(w.filename, w.lineno) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert ("user_code.py", 2) in where, (old, name, where)


def test_old_modules_no_longer_exist_as_files():
    """The finder only serves modules that are gone; one that exists is never shadowed."""
    import importlib.util

    for old in _compat.MOVED:
        spec = importlib.util.find_spec(old)
        assert spec is not None, old
        gone = isinstance(spec.loader, _compat._MovedModuleLoader)
        assert gone == (spec.origin in (None, "") or not spec.has_location), old


def test_field_report_style_imports_in_a_fresh_interpreter():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    from jaxgrad.projection import Projector\nexcept DeprecationWarning as e:\n"
            "    print('warned:', e)\n"
            "warnings.simplefilter('ignore')\n"
            "from jaxgrad.projection import Projector\n"
            "from jaxgrad.per_sample import per_sample_projected_grads, num_trainable\n"
            "from jaxgrad.config_sections import default_config\n"
            "from jaxgrad.surrogate import fit_subsets, estimate_subsets, SubsetFits\n"
            "from jaxgrad.selection import ensemble_scores, sample_subsets, cluster_samples\n"
            "from jaxgrad.store import GradientStore, StoreMismatchError\n"
            "from jaxgrad.models.lora import save_peft_adapter\n"
            "from jaxgrad.gradients import compute_gradient_store, store_model_id\n"
            "import jaxgrad.gradients.projection as p\n"
            "assert Projector is p.Projector\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warned: jaxgrad.projection moved (to jaxgrad.gradients.projection)" in proc.stdout
    assert proc.stdout.strip().endswith("ok"), proc.stdout


def test_unknown_names_still_raise():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        importlib.import_module("jaxgrad.models.lora").no_such_name  # noqa: B018
