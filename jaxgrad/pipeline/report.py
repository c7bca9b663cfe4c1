"""The run report: ``report.md``, built only from a run directory's artefacts (its PNG plots:
:mod:`jaxgrad.pipeline.plots`); the pipeline's last stage (:func:`stage_report`)."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import jax
import numpy as np

from jaxgrad import rundir
from jaxgrad._compat import moved_names
from jaxgrad.common.jsonio import read_json
from jaxgrad.config import FINETUNE_RUNS
from jaxgrad.pipeline.fingerprint import config_changes, model_input_digests, stage_fingerprints
from jaxgrad.pipeline.next_step import next_steps_lines
from jaxgrad.pipeline.plots import plot_clusters, plot_fidelity, plot_scores
from jaxgrad.pipeline.records import read_records
from jaxgrad.pipeline.timings import stage_seconds


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: ``|`` escaped, newlines as spaces."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _names(names) -> str:
    """Source names for a table cell, unambiguous whatever they hold: joined by ", ", each quoted
    as a JSON string (non-ASCII kept) when any name holds a comma or edge spaces or is empty."""
    names = [str(s) for s in names]
    if any("," in s or s != s.strip() or not s for s in names):
        return ", ".join(_cell(json.dumps(s, ensure_ascii=False)) for s in names)
    return _cell(", ".join(names))


def _name(name) -> str:
    """One source name for a table cell: quoted (JSON, non-ASCII kept) when it has edge spaces
    or is empty, so that " lead " and "lead" read differently."""
    name = str(name)
    return _cell(json.dumps(name, ensure_ascii=False) if name != name.strip() or not name else name)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or x == "" or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return str(x)
    return f"{float(x):.{digits}f}"


def estimated_quantity(metric: str, output_fn: str, short: bool = False) -> str:
    """What the surrogate estimates for ``metric`` under ``output_fn``, one name per quantity,
    never the fine-tunes' test cross-entropy's name (``jaxgrad.estimate.lift.estimate_subsets``)."""
    if short:
        return {"loss": "est. logistic loss" if output_fn == "logit_odds" else "est. token CE",
                "accuracy": "est. accuracy", "mean_output": "est. logit odds"}.get(metric, metric)
    if metric == "loss":
        return ("logistic loss of the target's logit odds, mean log(1 + e^−f̂)"
                if output_fn == "logit_odds" else "linearised token cross-entropy on the target")
    if metric == "accuracy":
        return "share of target samples with positive logit odds (f̂ > 0)"
    if metric == "mean_output":
        return "mean logit odds of the target"
    return str(metric)


def _finetune_rows(workdir: str) -> dict[str, dict]:
    """The pipeline's fine-tunes (in :data:`FINETUNE_RUNS`), then those made under other names
    (``scripts/finetune.py``), marked ``"by_hand": True``."""
    out = {}
    root = os.path.join(workdir, rundir.FINETUNE_DIR)
    others = sorted(set(os.listdir(root)) - set(FINETUNE_RUNS)) if os.path.isdir(root) else []
    for name in list(FINETUNE_RUNS) + others:
        path = os.path.join(rundir.finetune_dir(workdir, name), rundir.SOURCES_FILE)
        if os.path.isfile(path):
            out[name] = {**read_json(path), **({"by_hand": True} if name in others else {})}
    return out


def _by_hand_label(workdir: str, name: str) -> str:
    """" (by scripts/finetune.py; <settings that differ from the pipeline's selection run>)"."""
    def values(run):
        path = os.path.join(rundir.finetune_dir(workdir, run), rundir.RUN_FILE)
        return read_json(path)["values"] if os.path.isfile(path) else None

    mine, theirs = values(name), values("selection")
    if mine is None or theirs is None:
        return " (by scripts/finetune.py)"
    diff = [f"{k} {json.dumps(mine.get(k))}" for k in sorted(set(mine) | set(theirs))
            if not k.startswith(("finetune.", "inputs.")) and mine.get(k) != theirs.get(k)]
    if not diff:
        return " (by scripts/finetune.py; the pipeline runs' settings)"
    more = f", +{len(diff) - 3} more" if len(diff) > 3 else ""
    return f" (by scripts/finetune.py; unlike the runs above: {_cell(', '.join(diff[:3]))}{more})"


def theta_star_lines(workdir: str) -> list[str]:
    """θ*'s quality per source: the last validation row of ``meta_train/metrics.jsonl``."""
    path = os.path.join(workdir, rundir.META_TRAIN_METRICS)
    if not os.path.isfile(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    last = next((r for r in reversed(rows) if any(k.startswith("val_loss/") for k in r)), None)
    if last is None:
        return []
    sources = [k.split("/", 1)[1] for k in last if k.startswith("val_loss/")]
    lines = ["## θ* (meta-training)", "",
             f"The adapters all estimates start from, after step {last.get('step')}: validation "
             "token cross-entropy (and accuracy of the generated answer, where the source has "
             "answers) per source. A source θ* fits badly is estimated from a poor expansion "
             "point.", "", "| source | validation token cross-entropy | validation accuracy |",
             "|---|---|---|"]
    lines += [f"| {_name(s)} | {_fmt(last[f'val_loss/{s}'])} | {_fmt(last.get(f'val_acc/{s}'), 3)} |"
              for s in sources]
    return lines + [""]


# Interval ends within this many float32 ulps of the largest |end| are equal. Bootstrap ends are
# float32 means: a source in one distinct subset gets a few ulps ([-3.916786, -3.916785] in the
# tiny demo); 64 ulps (7.6e-6 relative) is far above that, below the differences between scores
# the report is about (2e-5 relative in the tiny demo, 1e-3 in the demo).
SAME_ULPS = 64


def significance_line(selection: dict) -> str:
    """Which neighbouring ranks (and which side of the selection) the 95% intervals separate;
    ends within :data:`SAME_ULPS` are equal (zero-width intervals never separate)."""
    ranking = [s for s in selection["ranking"]
               if np.isfinite(selection["scores"][selection["sources"].index(s)])]
    ci = {s: (selection["ci_low"][selection["sources"].index(s)],
              selection["ci_high"][selection["sources"].index(s)]) for s in ranking}
    scale = max([abs(float(x)) for s in ranking for x in ci[s] if np.isfinite(x)] or [0.0])
    tol = SAME_ULPS * float(np.finfo(np.float32).eps) * scale
    wide = {s for s in ranking if ci[s][1] - ci[s][0] > tol}
    apart = [(a, b) for a, b in zip(ranking, ranking[1:]) if ci[a][0] - ci[b][1] > tol]
    separated = [(a, b) for a, b in apart if a in wide and b in wide]
    text = (f"Significance: the 95% intervals separate "
            f"{_pairs_text(separated, len(ranking) - 1 - len(apart), len(apart) - len(separated))}.")
    kept, dropped = ([s for s in ranking if (s in selection["selected"]) is k] for k in (True, False))
    if kept and dropped:
        worst_kept = min(kept, key=lambda s: ci[s][0])
        best_dropped = max(dropped, key=lambda s: ci[s][1])
        above = ci[worst_kept][0] - ci[best_dropped][1] > tol
        clear = above and worst_kept in wide and best_dropped in wide
        relation = ("lies above" if clear else "is, by zero-width intervals only, above" if above
                    else "overlaps")
        text += (f" The selection cut is {'' if clear else 'not '}significant: the lowest "
                 f"interval kept ({_name(worst_kept)}, from {_fmt(ci[worst_kept][0])}) {relation} "
                 f"the highest dropped ({_name(best_dropped)}, up to {_fmt(ci[best_dropped][1])}).")
    if len(wide) < len(ranking):
        n = len(ranking) - len(wide)
        text += (f" {f'All {n}' if not wide else n} of the intervals have zero width (each of "
                 "those sources is in one distinct subset only): no evidence either way; more "
                 "`surrogate.num_subsets` (or larger subsets) give them a width.")
    return text


def _pairs_text(separated: list, overlap: int, by_points: int) -> str:
    """The pairs ``separated``; how many others ``overlap`` or are apart ``by_points`` only."""
    kinds = [(k, what) for k, what in ((overlap, "overlap: their order may be noise"), (
        by_points, "apart by zero-width intervals only: no evidence either way")) if k]
    others = "; ".join(f"{k} {what}" for k, what in kinds)
    n = overlap + by_points
    if separated:
        return (", ".join(f"{_name(a)} > {_name(b)}" for a, b in separated)
                + (f"; the other {n} neighbouring pairs are not separated ({others})" if n else ""))
    if len(kinds) == 1:
        return f"no two neighbouring ranks (all {n} neighbouring pairs {'are ' * (not overlap)}{kinds[0][1]})"
    return f"no two neighbouring ranks (of the {n} neighbouring pairs, {others})"


def target_metrics(run: dict, target: str | None) -> dict[str, float | None]:
    m = run.get("metrics", {})
    loss = m.get(f"test_loss/{target}", m.get("test_loss"))
    acc = m.get(f"test_acc/{target}", m.get("test_acc"))
    return {"test_loss": loss, "test_acc": acc, "test_choice_acc": m.get("test_choice_acc")}


def _target(config, selection: dict) -> str | None:
    """The target: recorded since units can be clusters (several of kind "target"); before, the
    one source of kind "target"."""
    kinds = selection.get("kinds", {})
    return selection.get("target") or next(
        (s for s, k in kinds.items() if k == "target"), None) or config.data.get(
        "synthetic", {}).get("target")


def _header_lines(workdir: str, selection: dict, target: str | None) -> list[str]:
    lines = ["# jaxgrad run report", ""]
    units = (f"Units: {len(selection['sources'])} (clusters of samples and whole sources, see "
             "Clusters; every table's \"source\" is a unit)" if selection.get("groups")
             else f"Sources: {len(selection['sources'])}")
    return lines + [f"Run directory: `{workdir}`. Target: **{target}**. {units}.", ""]


def _timings_section(workdir: str) -> list[str]:
    timings = os.path.join(workdir, rundir.TIMINGS_FILE)
    if not os.path.isfile(timings):
        return []
    computed = stage_seconds([json.loads(l) for l in open(timings)])
    lines = ["## Stages", "", "| stage | seconds (when computed) |", "|---|---|"]
    return lines + [f"| {k} | {v:.1f}" + (f" (in {n} runs)" if n > 1 else "") + " |"
                    for k, (v, n) in computed.items() if k != "report"] + [""]


def _estimates_section(config, est_rows: list[dict]) -> list[str]:
    conv = np.mean([r["converged"] == "True" for r in est_rows]) if est_rows else float("nan")
    return ["## Estimates", "",
            f"{len(est_rows)} random subsets scored by the surrogate "
            f"(objective `{config.surrogate.objective}`, C={config.surrogate.C}, "
            f"scale={config.surrogate.scale}, mode `{config.surrogate.mode}`, projection "
            f"k={config.gradients.projection_dim}, output `{config.gradients.output_fn}`); "
            f"solver converged on {100 * conv:.0f}% of them. Table: `estimates/estimates.csv`.", ""]


def _selection_section(config, selection: dict, quantity: str) -> list[str]:
    kinds = selection.get("kinds", {})
    lines = ["## Selection", "",
             f"Score = mean over the subsets containing the source of the estimated {quantity} "
             f"(the surrogate's estimate for fine-tuning on the subset; "
             f"{'higher' if selection['higher_is_better'] else 'lower'} is better; shown "
             f"{'as is' if selection['higher_is_better'] else 'negated'} so higher is better), "
             "95% bootstrap interval over subsets.", "",
             "| rank | source | kind | score | 95% CI | subsets | grad-sim cosine | repr-sim cosine "
             "| selected |",
             "|---|---|---|---|---|---|---|---|---|"]
    rep = selection.get("repr_sim_scores") or [None] * len(selection["sources"])
    for rank, s in enumerate(selection["ranking"], 1):
        i = selection["sources"].index(s)
        lines.append(f"| {rank} | {_name(s)} | {_cell(kinds.get(s, ''))} | {_fmt(selection['scores'][i])} | "
                     f"[{_fmt(selection['ci_low'][i])}, {_fmt(selection['ci_high'][i])}] | "
                     f"{selection['counts'][i]} | {_fmt(selection['grad_sim_scores'][i], 3)} | "
                     f"{_fmt(rep[i], 3)} | {'✓' if s in selection['selected'] else ''} |")
    method = selection.get("method") or "ensemble"
    step = selection.get("stepwise")
    if method == "threshold":
        lines += ["", f"Selected: every source with score >= `selection.threshold` = "
                      f"{config.selection.threshold}."]
    elif step:
        lines += ["", f"Selected by `{method}` stepwise selection on the surrogate, in this order: "
                      f"{_names(step['order'])}; score (higher is better) "
                      f"{_fmt(step['initial_score'])} with no source → "
                      + " → ".join(_fmt(v) for v in step["path_scores"])
                      + f"; {step['n_evaluated']} subsets scored in {step['n_calls']} batched "
                      f"calls, {step['seconds']:.1f} s."]
    lines += ["", significance_line(selection)]
    if selection.get("ranking_auc") is not None:
        lines += ["", f"Ranking AUC (a target/related source ranks above a noisy/unrelated one): "
                      f"**{selection['ranking_auc']:.3f}**"]
    return lines + ["", "![scores](scores.png)", ""]


def _clusters_section(workdir: str, selection: dict) -> list[str]:
    """The cluster view (and ``clusters.png``) when the units are clusters of samples."""
    groups_path = os.path.join(workdir, rundir.GROUPS_FILE)
    if not (selection.get("groups") and os.path.isfile(groups_path)):
        return []
    groups = read_json(groups_path)
    plot_clusters(selection, os.path.join(workdir, rundir.CLUSTERS_PLOT))
    return cluster_lines(groups, selection) + ["", "![clusters](clusters.png)", ""]


def _finetune_section(workdir: str, selection: dict, runs: dict[str, dict],
                      target: str | None) -> list[str]:
    if not runs:
        return []
    sizes = dict(zip(selection["sources"], (selection.get("groups") or {}).get("sizes") or []))
    lines = ["## Fine-tuning the base model on each choice of sources", "",
             f"Target **{target}**, test split (never used for selection). Test loss: "
             "the token cross-entropy of the completions (not the surrogate's estimate "
             "above).", "",
             "| run | sources | train samples | test token cross-entropy | test accuracy (generated "
             "answer) | test accuracy (most likely choice) |", "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        m = target_metrics(run, target)
        n = sum(sizes[u] for u in run["sources"]) if sizes else run.get("n_train", "")
        same = f" (= {_cell(run['same_as'])}: the same sources, trained once)" \
            if run.get("same_as") else (_by_hand_label(workdir, name) if run.get("by_hand")
                                        else "")
        lines.append(f"| {_cell(name)}{same} | {_names(run['sources'])} | {n} | "
                     f"{_fmt(m['test_loss'])} | {_fmt(m['test_acc'], 3)} | "
                     f"{_fmt(m.get('test_choice_acc'), 3)} |")
    return lines + [""]


def _fidelity_section(config, workdir: str) -> list[str]:
    """The fidelity section (and ``fidelity.png``) when ``fidelity/`` matches this config; why it
    is not shown when it does not."""
    fid_path = os.path.join(workdir, rundir.FIDELITY_FILE)
    stale = _fidelity_changes(config, workdir) if os.path.isfile(fid_path) else None
    if os.path.isfile(fid_path) and not stale:
        fid = read_json(fid_path)
        plot_fidelity(fid, os.path.join(workdir, rundir.FIDELITY_PLOT))
        return fidelity_lines(fid) + ["", "![fidelity](fidelity.png)", ""]
    if stale:
        return ["## Fidelity", "", "`fidelity/fidelity.json` was computed under other "
                "settings than this config's, so it is not shown: "
                + "; ".join(f"`{k}`: {json.dumps(a)} → {json.dumps(b)}" for k, a, b in stale[:8])
                + ". Run the fidelity stage with this config (`pipeline.fidelity = True`, "
                "`--on_config_change=rerun`) to measure it again.", ""]
    return []


def write_report(config, workdir: str) -> str:
    """Write the run's report from its artefacts only (nothing is recomputed).

    Args:
      config: the run's ml_collections config (target, output function, selection and fidelity
        settings, for the text and the "Next" command).
      workdir: the run directory; needs ``selection/selection.json`` and
        ``estimates/estimates.csv``, and reads the fine-tunes, θ*'s metrics, groups, fidelity and
        ``timings.jsonl`` when they exist.

    Returns:
      The path of ``<workdir>/report.md``. Also written: ``scores.png``, ``clusters.png`` (when
      the units are clusters of samples) and ``fidelity.png`` (when the fidelity stage ran).

    Raises:
      FileNotFoundError: the selection or estimates artefact is missing (run those stages first).
    """
    selection = read_json(os.path.join(workdir, rundir.SELECTION_FILE))
    with open(os.path.join(workdir, rundir.ESTIMATES_FILE), newline="") as f:
        est_rows = list(csv.DictReader(f))
    runs = _finetune_rows(workdir)
    target = _target(config, selection)
    quantity = estimated_quantity(selection["metric"], str(config.gradients.output_fn))
    plot_scores(selection, os.path.join(workdir, rundir.SCORES_PLOT),
                estimated_quantity(selection["metric"], str(config.gradients.output_fn), True))
    lines = _header_lines(workdir, selection, target)
    lines += _timings_section(workdir)
    lines += _estimates_section(config, est_rows)
    lines += _selection_section(config, selection, quantity)
    lines += theta_star_lines(workdir)
    lines += _clusters_section(workdir, selection)
    lines += _finetune_section(workdir, selection, runs, target)
    lines += _fidelity_section(config, workdir)
    lines += next_steps_lines(config, workdir, selection)
    path = os.path.join(workdir, rundir.REPORT_FILE)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def stage_report(config, workdir: str) -> str:
    """The report stage: :func:`write_report` on process 0 only.

    Args:
      config: the run's ml_collections config.
      workdir: the run directory.

    Returns:
      The path of ``<workdir>/report.md`` on every process (the others write nothing).

    Raises:
      FileNotFoundError: as :func:`write_report`.
    """
    if jax.process_index() != 0:  # one process writes the report
        return os.path.join(workdir, rundir.REPORT_FILE)
    return write_report(config, workdir)


def cluster_lines(groups: dict, selection: dict) -> list[str]:
    """The report's cluster view: per unit its size, sources, score with interval, whether it was
    kept, and the start of a few of its prompts."""
    lines = ["## Clusters", "",
             f"{groups['num_clusters']} clusters of the train samples of "
             f"{_names(groups['clustered_sources'])} by their projected gradients "
             f"({groups['method']}, {groups['metric']} distance; `groups/groups.json`); "
             "the other sources stay whole. Sorted by score.", "",
             "| unit | samples | sources | score | 95% CI | kept | example prompts |",
             "|---|---|---|---|---|---|---|"]
    units = {u["name"]: u for u in groups["units"]}
    for name in selection["ranking"]:
        i = selection["sources"].index(name)
        u = units.get(name, {})
        src = ", ".join(f"{_cell(s)} ({n})" for s, n in (u.get("sources") or {}).items())
        prompts = " / ".join(_cell(" ".join(p.split())[:60]) for p in u.get("example_prompts", [])[:2])
        lines.append(f"| {_name(name)} | {u.get('size', '')} | {src} | "
                     f"{_fmt(selection['scores'][i])} | [{_fmt(selection['ci_low'][i])}, "
                     f"{_fmt(selection['ci_high'][i])}] | "
                     f"{'✓' if name in selection['selected'] else ''} | {prompts} |")
    return lines


def fidelity_lines(fid: dict) -> list[str]:
    """The report's fidelity section: level and change accuracy of each estimate."""
    st = fid.get("settings") or {}
    lines = ["## Fidelity: estimates against real fine-tuning from θ*", "",
             f"{len(fid['rows'])} subsets of the estimates table, each fine-tuned from θ* for "
             f"{st.get('steps')} step(s) of {st.get('optimizer', 'adamw')} at lr "
             f"{st.get('learning_rate')}; target loss at θ*: {_fmt(fid.get('theta_star_loss'))}. "
             "Change = loss minus the loss at θ* (the stricter test: short fine-tunes barely move "
             "the level).", "",
             "| estimate | scale | level: mean relative error | Spearman | change: relative error "
             "| change: Pearson | signs right |", "|---|---|---|---|---|---|---|"]
    blocks = [(k, st.get("scale"), v) for k, v in fid["summary"].items()]
    cal = fid.get("calibrated") or {}
    blocks += [(f"{k} (calibrated)", cal.get("scale"), v) for k, v in cal.items()
               if isinstance(v, dict)]
    for key, scale, v in blocks:
        lines.append(f"| {key} | {_fmt(scale, 4)} | {_fmt(v.get('relative_error'), 3)} | "
                     f"{_fmt(v.get('spearman'), 3)} | {_fmt(v.get('change_relative_error'), 3)} | "
                     f"{_fmt(v.get('change_pearson'), 3)} | {_fmt(v.get('sign_agreement'), 2)} |")
    if "first_order_error" in fid:
        lines.append(f"\nFirst-order error (mean squared relative error of f(θ*)+gᵀΔ vs f(θ*+Δ)): "
                     f"{_fmt(fid['first_order_error'], 6)}. The calibrated scale "
                     "(jaxgrad.pipeline.fidelity.suggest_scale) matches the surrogate's step to the real "
                     "fine-tunes' size; set `surrogate.scale` to it to estimate steps of that size.")
    return lines


def _fidelity_changes(config, workdir: str) -> list[tuple[str, Any, Any]]:
    """``[]`` when ``fidelity/`` was computed under this config (its stages.json record matches);
    otherwise what changed (old → new; with the stage switched off its config is not checked
    by the pipeline, and an old result is not shown)."""
    rec = read_records(workdir).get("fidelity")
    fp = stage_fingerprints(config, model_input_digests(config, workdir))["fidelity"]
    if rec and rec.get("fingerprint") == fp.fingerprint:
        return []
    if not rec:
        return [("fidelity record", "(none in stages.json)", "(this config)")]
    return config_changes(rec.get("config", {}), fp.config) or [
        ("inputs of fidelity", "(earlier stages)", "(recomputed since)")]


# ---- the README's demo excerpt against a run's report ---------------------------------------------


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of ``text``: a list of rows (the header first, the ``|---|`` rule
    dropped), each a list of stripped cell texts."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|") and line.rstrip().endswith("|"):
            if not set(line.strip()) <= set("|-: "):  # not the |---|---| rule
                current.append([c.strip() for c in line.strip()[1:-1].split(" | ")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def compare_tables(excerpt: str, report: str, atol: float = 0.0) -> list[str]:
    """Differences between the tables of ``excerpt`` (the README's demo section) and ``report``'s
    tables of the same header (numbers within ``atol``, text exactly; an excerpt table or row
    missing from the report counts too); ``[]`` when every cell of every excerpt table matches."""
    by_header = {tuple(t[0]): t for t in markdown_tables(report)}
    problems = []
    for table in markdown_tables(excerpt):
        header = tuple(table[0])
        theirs = by_header.get(header)
        if theirs is None:
            problems.append(f"table with header {list(header)} is not in the report")
            continue
        rows = {r[0]: r for r in theirs[1:]}
        for row in table[1:]:
            other = rows.get(row[0])
            if other is None:
                problems.append(f"{header[0]} {row[0]!r}: no such row in the report")
                continue
            for name, a, b in zip(header, row, other):
                x, y = _number(a), _number(b)
                same = (abs(x - y) <= atol + 1e-12) if x is not None and y is not None else a == b
                if not same:
                    problems.append(f"{header[0]} {row[0]!r}, {name}: README {a!r}, report {b!r}")
    return problems


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
