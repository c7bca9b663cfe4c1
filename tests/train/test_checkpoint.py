"""jaxgrad.train.checkpoint: a checkpoint restores in a fresh process to the parameters it saved;
opening one read-only prints none of orbax's notices."""

from __future__ import annotations

import pytest

from helpers.training import quick_cfg, run_subprocess, tiny_data, tiny_model
from jaxgrad.common import sharding as sharding_lib
from jaxgrad.train import checkpoint as ckpt_lib, fit, make_evaluator


def test_checkpoint_restores_in_fresh_process(tmp_path):
    d = tiny_data()
    model, tok = tiny_model()
    cfg = quick_cfg(num_steps=4)
    result = fit(model, tok, d.examples("train"), cfg, str(tmp_path / "run"),
                 val_examples=d.examples("validation"), sources=d.sources)
    mesh = sharding_lib.make_mesh(1, 1)
    ours = make_evaluator(result.model, tok, d.examples("validation"), cfg,
                          sources=d.sources)(result.model, mesh)["val_loss"]
    assert ours == pytest.approx(result.metrics["val_loss"], abs=1e-6)
    out = run_subprocess(f"""
        import json
        from jaxgrad.common import sharding
        from jaxgrad.train.checkpoint import restore_params
        from jaxgrad.train import make_evaluator
        from helpers.training import tiny_data, tiny_model, quick_cfg
        d = tiny_data()
        model, tok = tiny_model()
        ev = make_evaluator(model, tok, d.examples("validation"), quick_cfg(num_steps=4),
                            sources=d.sources)
        mesh = sharding.make_mesh(1, 1)
        before = ev(model, mesh)["val_loss"]
        model, meta = restore_params(model, {str(tmp_path / 'run' / 'ckpt')!r}, "latest")
        print(json.dumps({{"before": before, "after": ev(model, mesh)["val_loss"],
                          "step": meta["step"]}}))
    """, tmp_path)
    assert out["step"] == 4
    assert out["before"] != pytest.approx(ours, abs=1e-3), "the untrained model already matched"
    assert out["after"] == pytest.approx(ours, abs=1e-6), (
        f"restored checkpoint gives val_loss {out['after']} in a fresh process, {ours} here")


def test_opening_a_checkpoint_read_only_logs_no_orbax_notice(tmp_path, caplog):
    """issue 16, item 8: restoring θ* (read-only) does not print orbax's read-only warnings."""
    import logging

    writer = ckpt_lib.make_manager(tmp_path / "ckpt", async_save=False)
    writer.close()
    with caplog.at_level(logging.WARNING):
        reader = ckpt_lib.make_manager(tmp_path / "ckpt", read_only=True, async_save=False)
        reader.close()
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, noisy
