"""jaxgrad.pipeline.run on configs/demo.py:tiny (the session fixture ``run_dir``): every artefact
written and recorded, reused stages said so and not recomputed, full fine-tuning without
adapters through every stage, sources named with awkward characters through every stage and file
(issue 12, kind 9), and the whole pipeline as 2 processes on 8 devices against the 1-device run."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from configs import demo
from helpers import REPO
from helpers.runs import NAMES, UP_TO_SELECTION, names_config, stage_records
from jaxgrad.estimate.stage import read_estimates
from jaxgrad.pipeline import STAGES, run_pipeline
from jaxgrad.pipeline.fingerprint import stage_fingerprints


def test_every_artefact_written(run_dir):
    for path in ["base/model.safetensors", "base/tokenizer.json", "meta_train/adapter/adapter_config.json",
                 "gradients/train/manifest.json", "estimates/estimates.csv",
                 "selection/selection.json", "finetune/selection/sources.json",
                 "finetune/all/sources.json", "report.md", "scores.png", "stages.json"]:
        assert os.path.isfile(os.path.join(run_dir, path)), f"missing {path}"
    records = stage_records(run_dir)
    fingerprints = stage_fingerprints(demo.get_config("tiny"))
    assert list(records) == [s for s in STAGES if s != "groups"]  # groups.by = "source": off
    for stage, rec in records.items():
        assert rec["fingerprint"] == fingerprints[stage].fingerprint and rec["complete"] is True


def test_reused_stages_say_so_and_an_unbuilt_base_prints_nothing(run_dir, tmp_path, capsys):
    """issue 16, item 8: a reused stage prints "reused", not "done in 0.0s"; with a pretrained
    model there is no base stage to announce."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    run_pipeline(demo.get_config("tiny"), workdir, stages=UP_TO_SELECTION)
    out = capsys.readouterr().out
    for stage in UP_TO_SELECTION:
        assert f"[jaxgrad] stage {stage} ... reused" in out, out
        assert f"stage {stage} done in" not in out, out
    config = demo.get_config("tiny")
    config.base.pretrain = False
    config.model.name_or_path = os.path.join(workdir, "base")
    run_pipeline(config, str(tmp_path / "other"), stages=["base"])
    assert "stage base" not in capsys.readouterr().out


def test_estimates_resume_does_not_recompute(run_dir, tmp_path):
    workdir = str(tmp_path / "run")  # a copy: the run appends to the shared run's timings
    shutil.copytree(run_dir, workdir)
    table = os.path.join(workdir, "estimates", "estimates.csv")
    before, stamp = open(table).read(), os.path.getmtime(table)
    run_pipeline(demo.get_config("tiny"), workdir, stages=["estimates"])
    assert open(table).read() == before
    # the same numbers would come out of a recomputation too: the table is not written again,
    # and the run is timed as a reuse
    assert os.path.getmtime(table) == stamp, "the estimates were computed again"
    last = json.loads(open(os.path.join(workdir, "timings.jsonl")).read().splitlines()[-1])
    assert last["stage"] == "estimates" and last["reused"] is True, last


def test_full_finetune_without_adapters_differentiates_every_parameter(tmp_path):
    """train.full_finetune=True, lora.rank=0: the gradients, the (exact) estimates and fidelity
    take θ to be every parameter, as meta-training trained it. They pass train.full_finetune to
    the one trainable split (jaxgrad.models.lora), which refuses LoRA mode without adapters
    rather than silently widening it."""
    import jax
    from flax import nnx

    from jaxgrad.gradients.store import GradientStore
    from jaxgrad.models.lora import has_adapters
    from jaxgrad.rundir import resolved_config
    from jaxgrad.train.stage import load_theta_star

    config = demo.get_config("tiny")
    config.train.full_finetune, config.lora.rank = True, 0
    config.surrogate.mode = "exact"
    config.pipeline.finetune_runs = ("selection",)
    config.fidelity.num_subsets = 1
    workdir = str(tmp_path / "run")
    run_pipeline(config, workdir, stages=["base", "meta_train", "gradients", "estimates",
                                          "fidelity"])
    model, _ = load_theta_star(resolved_config(config, workdir), workdir)
    assert not has_adapters(model)
    every = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    manifest = GradientStore.open(os.path.join(workdir, "gradients", "train")).manifest
    assert manifest["projector"]["dim"] == every
    with open(os.path.join(workdir, "estimates", "estimates.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows and all(np.isfinite(float(r["exact_loss"])) for r in rows)
    assert os.path.isfile(os.path.join(workdir, "fidelity", "fidelity.json"))


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def _assert_same_artefacts(run_dir, workdir, what):
    """Every artefact of ``workdir`` equals the 1-device run's up to float32 rounding (sharded
    matmuls and all-reduces sum in another order; 24 pretraining and training steps carry the
    ~1e-7 differences forward), and the selection is the same."""
    from jaxgrad.gradients.store import GradientStore

    def close(a, b, name, rtol=1e-3):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)
        assert err < rtol, f"{name}: {what} differs from 1 device by {err:.2e} (relative to max)"

    # Adam divides by sqrt(v): in the LoRA B matrices, still near their zero start after 4
    # steps, rounding differences of the gradients come out ~1e-3 relative (measured 1.1e-3).
    for rel, rtol in (("base/model.safetensors", 1e-3),
                      ("meta_train/adapter/adapter_model.safetensors", 5e-3)):
        one, other = _tensors(os.path.join(run_dir, rel)), _tensors(os.path.join(workdir, rel))
        assert one.keys() == other.keys()
        for k in one:
            close(other[k], one[k], f"{rel}:{k}", rtol)
    for name in ("train", "target"):
        one = GradientStore.open(os.path.join(run_dir, "gradients", name))
        other = GradientStore.open(os.path.join(workdir, "gradients", name))
        assert one.example_ids == other.example_ids and other.complete
        close(other.feats(), one.feats(), f"gradients/{name}", rtol=5e-3)
    with open(os.path.join(run_dir, "estimates", "estimates.csv")) as f1, \
            open(os.path.join(workdir, "estimates", "estimates.csv")) as f2:
        one, other = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [r["sources"] for r in one] == [r["sources"] for r in other], "estimates rows"
    close([float(r["loss"]) for r in other], [float(r["loss"]) for r in one], "estimates loss",
          rtol=1e-4)
    s1 = json.load(open(os.path.join(run_dir, "selection", "selection.json")))
    s2 = json.load(open(os.path.join(workdir, "selection", "selection.json")))
    assert s2["selected"] == s1["selected"] and s2["baselines"] == s1["baselines"]
    close(np.nan_to_num(s2["scores"]), np.nan_to_num(s1["scores"]), "selection scores", rtol=1e-4)
    for name in demo.get_config("tiny").pipeline.finetune_runs:
        m1 = json.load(open(os.path.join(run_dir, "finetune", name, "sources.json")))["metrics"]
        m2 = json.load(open(os.path.join(workdir, "finetune", name, "sources.json")))["metrics"]
        close(m2["test_loss"], m1["test_loss"], f"finetune/{name} test loss")
    f1 = json.load(open(os.path.join(run_dir, "fidelity", "fidelity.json")))
    f2 = json.load(open(os.path.join(workdir, "fidelity", "fidelity.json")))
    close([r["true_loss"] for r in f2["rows"]], [r["true_loss"] for r in f1["rows"]],
          "fidelity true losses")
    assert os.path.isfile(os.path.join(workdir, "report.md"))


def test_whole_pipeline_on_8_devices_in_two_processes_matches_one_device(run_dir, tmp_path):
    """The tiny pipeline as 2 jax.distributed processes of 4 CPU devices each (collectives over
    gloo), one run directory: base pretraining, meta-training, the final and the fidelity
    fine-tunes on an (8, 1) mesh over both processes' devices; each process computing its rows
    of the gradient stores with every chunk sharded over its 4 devices; the surrogate fits'
    subsets sharded over all 8; process 0 writing the shared files. Every artefact as in the
    1-device, 1-process run (one test for both: a pipeline run costs minutes on 2 cores)."""
    import socket
    import subprocess
    import sys
    import textwrap

    workdir = str(tmp_path / "run2p")
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import sys, jax
        pid, port = int(sys.argv[1]), int(sys.argv[2])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}", num_processes=2,
                                   process_id=pid)
        from configs import demo
        from jaxgrad.pipeline import run_pipeline
        assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
        run_pipeline(demo.get_config("tiny"), {workdir!r})
        print("process", jax.process_index(), "of", jax.process_count(), flush=True)
        jax.distributed.shutdown()
    """))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port)], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert [o.strip().splitlines()[-1] for o, _ in outs] == ["process 0 of 2", "process 1 of 2"]
    _assert_same_artefacts(run_dir, workdir, "2 processes x 4 devices")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    path = str(d / "data.jsonl")
    with open(path, "w") as f:
        for i, name in enumerate(NAMES):
            for j in range(8):
                f.write(json.dumps({"instruction": f"{i}+{j}=", "input": "",
                                    "output": str(i + j), "skill": name}) + "\n")
    workdir = str(d / "run")
    config = names_config(path)
    out = run_pipeline(config, workdir)
    return config, workdir, out


def test_every_stage_keeps_the_names(run):
    config, workdir, out = run
    selection = json.load(open(os.path.join(workdir, "selection", "selection.json")))
    assert sorted(selection["sources"]) == sorted(NAMES)
    assert set(selection["selected"]) <= set(NAMES) and len(selection["selected"]) == 2
    rows = read_estimates(os.path.join(workdir, "estimates", "estimates.csv"))
    for r in rows:
        assert len(r["source_list"]) == 2 and set(r["source_list"]) <= set(NAMES), r["sources"]
    runs = {"selection": selection["selected"], **selection["baselines"]}
    for name in config.pipeline.finetune_runs:
        done = json.load(open(os.path.join(workdir, "finetune", name, "sources.json")))
        assert done["sources"] == list(runs[name]), f"finetune {name}: names changed on the way"
    fid = json.load(open(os.path.join(workdir, "fidelity", "fidelity.json")))
    table = {int(r["subset"]): r["source_list"] for r in rows}
    for row in fid["rows"]:
        assert row["sources"] == table[row["subset"]]
    report = open(os.path.join(workdir, "report.md")).read()
    assert "| [draft] \\|2\\| |" in report or "[draft] \\|2\\|" in report, \
        "a '|' in a source name must be escaped in the report's tables"
    for name in NAMES:
        shown = json.dumps(name) if "," in name else name
        assert shown.replace("|", "\\|") in report, f"{name!r} missing from the report"
