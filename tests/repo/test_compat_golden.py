"""Shipped configs and their stage fingerprints against the golden files in tests/fixtures/compat/.

A run directory's stages are reused only under unchanged fingerprints (jaxgrad.pipeline.fingerprint). So a
renamed key, a newly declared key or a changed default silently costs every old run directory a
recomputation. These tests name the config, the stage and the keys when that happens. Generator
and the description of what is pinned: tests/fixtures/compat/make_golden.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

from helpers import fixture

_spec = importlib.util.spec_from_file_location(
    "compat_make_golden", os.path.join(fixture("compat"), "make_golden.py"))
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

CONFIG_IDS = golden.config_ids()


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def committed() -> tuple[dict, dict]:
    return _load(golden.CONFIGS_FILE), _load(golden.FINGERPRINTS_FILE)


def _rel(path: str) -> str:
    return os.path.relpath(path, golden.REPO)


def _keys(diffs, indent: str) -> list[str]:
    return [f"{indent}{k}: {a} → {b}" for k, a, b in diffs]


def _advice(cid: str, stages: list[str] | None) -> list[str]:
    regen = ["If the change is intended, regenerate the golden files with",
             f"  {golden.REGENERATE}"]
    keep = ("If it is not intended (a moved module or a unified default, issue 17), keep the key "
            "and the value every run directory recorded (docs/dev/layout_plan.md §4.7, §5.4).")
    if stages is None:  # configs.json: the fingerprint test names the stages
        return regen + [
            f"and note in the commit message which stages run directories written before it "
            f"will rerun: test_stage_fingerprints_match_golden[{cid}] names them (none if it "
            "passes: a key left out of every fingerprint, or a new key at its INERT_DEFAULTS "
            "value).", keep]
    return regen + [
        f"and note in the commit message that run directories written before it will rerun "
        f"stage(s) {', '.join(stages)} of {golden.describe(cid)} (those they hold): reusing "
        "one raises ConfigChangedError, and --on_config_change=rerun deletes and recomputes "
        "those stages (a run.json change retrains finetune/<name>).", keep]


def test_every_shipped_config_and_variant_is_pinned(committed):
    shipped = sorted(f[:-3] for f in os.listdir(os.path.join(golden.REPO, "configs"))
                     if f.endswith(".py") and f != "__init__.py")
    assert shipped == sorted(golden.VARIANTS), (
        f"configs/ holds {shipped}, the golden files pin {sorted(golden.VARIANTS)}: add the "
        f"config and its variants to VARIANTS in {_rel(golden.__file__)} and run "
        f"{golden.REGENERATE}")
    for module, variants in golden.VARIANTS.items():
        mod = importlib.import_module(f"configs.{module}")
        with pytest.raises(ValueError) as err:  # names the variants it accepts
            mod.get_config("no-such-variant")
        accepted = set(re.findall(r"'([\w-]+)'", str(err.value).split("expected", 1)[-1]))
        assert accepted, f"configs/{module}.py: cannot read its variants from {err.value}"
        pinned = {v or "default" for v in variants}
        assert accepted == pinned, (
            f"configs/{module}.py accepts the variants {sorted(accepted)}, the golden files pin "
            f"{sorted(pinned)}: update VARIANTS in {_rel(golden.__file__)} and run "
            f"{golden.REGENERATE}")
        # ":default" is the config without a variant, which is what is pinned.
        assert golden.config_dict(mod.get_config("default")) == golden.config_dict(
            mod.get_config())
    for data in committed:
        assert sorted(data) == sorted(CONFIG_IDS), (
            f"the golden files pin {sorted(data)}, expected {sorted(CONFIG_IDS)}: run "
            f"{golden.REGENERATE}")


@pytest.mark.parametrize("cid", CONFIG_IDS)
def test_resolved_config_matches_golden(cid, committed):
    want = committed[0].get(cid)
    assert want is not None, f"{cid} is not in {_rel(golden.CONFIGS_FILE)}: run {golden.REGENERATE}"
    diffs = golden.differences(want, golden.config_dict(golden.load_config(cid)))
    if diffs:
        lines = [f"config {cid!r} ({golden.describe(cid)}) differs from "
                 f"{_rel(golden.CONFIGS_FILE)}; keys that differ (golden → now):"]
        lines += _keys(diffs, "  ")
        lines += _advice(cid, None)
        pytest.fail("\n".join(lines), pytrace=False)


@pytest.mark.parametrize("cid", CONFIG_IDS)
def test_stage_fingerprints_match_golden(cid, committed):
    want = committed[1].get(cid)
    assert want is not None, (f"{cid} is not in {_rel(golden.FINGERPRINTS_FILE)}: run "
                              f"{golden.REGENERATE}")
    now = golden.fingerprint_record(golden.load_config(cid))
    lines: list[str] = []
    changed: list[str] = []
    old_stages, new_stages = want["stages"], now["stages"]
    shown: set[tuple[str, str, str]] = set()  # diffs named at an earlier stage
    for stage in golden.in_pipeline_order(set(old_stages) | set(new_stages)):
        old, new = old_stages.get(stage), new_stages.get(stage)
        if old is None or new is None:
            lines.append(f"  stage {stage!r}: {'new' if old is None else 'gone'}")
            changed.append(stage)
            continue
        config_diffs = golden.differences(old["config"], new["config"])
        inputs = sorted(d for d in set(old["inputs"]) | set(new["inputs"])
                        if old["inputs"].get(d) != new["inputs"].get(d))
        if old["fingerprint"] == new["fingerprint"] and not config_diffs and not inputs:
            continue
        changed.append(stage)
        fresh = [d for d in config_diffs if d not in shown]
        shown.update(config_diffs)
        lines.append(f"  stage {stage!r}: fingerprint {old['fingerprint'][:12]}… → "
                     f"{new['fingerprint'][:12]}…"
                     + (f"; inputs changed: {', '.join(inputs)}" if inputs else "")
                     + ("" if fresh or not config_diffs else
                        "; keys that differ: as named above"))
        if fresh:
            lines.append("    keys that differ (golden → now):")
            lines += _keys(fresh, "      ")
    run_diffs = golden.differences(want["finetune_run_values"], now["finetune_run_values"])
    if run_diffs:
        lines.append("  finetune/<name>/run.json values: keys that differ (golden → now):")
        lines += _keys(run_diffs, "      ")
    if lines:
        head = (f"stage fingerprints of config {cid!r} ({golden.describe(cid)}) differ from "
                f"{_rel(golden.FINGERPRINTS_FILE)}:")
        stages = changed + (["finetune/<name> runs (run.json)"] if run_diffs else [])
        pytest.fail("\n".join([head] + lines + _advice(cid, stages)), pytrace=False)
