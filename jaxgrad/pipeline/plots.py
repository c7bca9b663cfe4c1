"""The run report's PNG plots: ``scores.png``, ``fidelity.png``, ``clusters.png``.

matplotlib is imported inside each function, with the Agg backend (no display needed), so
importing this module does not import matplotlib."""

from __future__ import annotations

import numpy as np

KIND_COLORS = {"target": "#1f77b4", "related": "#2ca02c", "noisy": "#d62728", "unrelated": "#ff7f0e"}


def plot_scores(selection: dict, path: str, quantity: str | None = None) -> None:
    """Per-source ensemble scores with bootstrap intervals, coloured by planted kind; selected
    sources ringed, and the cut drawn where the selection keeps a prefix of the ranking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = selection["ranking"]
    idx = [selection["sources"].index(s) for s in sources]
    scores = np.array(selection["scores"])[idx]
    lo = np.array(selection["ci_low"])[idx]
    hi = np.array(selection["ci_high"])[idx]
    kinds = selection.get("kinds", {})
    colors = [KIND_COLORS.get(kinds.get(s), "#7f7f7f") for s in sources]
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(sources) + 2.5), 3.8))
    x = np.arange(len(sources))
    ax.errorbar(x, scores, yerr=[scores - lo, hi - scores], fmt="none", ecolor="k", capsize=3, lw=1)
    ax.scatter(x, scores, c=colors, s=60, zorder=3)
    chosen = [i for i, name in enumerate(sources) if name in selection["selected"]]
    if chosen:
        ax.scatter(x[chosen], scores[chosen], s=160, facecolors="none", edgecolors="k", lw=1.2,
                   zorder=4, label="selected")
    if chosen and chosen == list(range(len(chosen))) and len(chosen) < len(sources):
        ax.axvline(len(chosen) - 0.5, color="k", ls="--", lw=1)
        ax.annotate("selection cut", (len(chosen) - 0.5, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -10), textcoords="offset points", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(sources, rotation=45, ha="right")
    sign = "" if selection["higher_is_better"] else "−"
    ax.set_ylabel(f"score ({sign}{quantity or 'estimated ' + selection['metric']})")
    ax.set_title("Per-source ensemble scores, best first (95% CI)", fontsize=10)
    present = [k for k in KIND_COLORS if k in kinds.values()]
    handles = [Patch(color=KIND_COLORS[k], label=k) for k in present]
    if chosen:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="o", ls="", mfc="none", mec="k", ms=10,
                              label="selected"))
    if handles:
        ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fidelity(fidelity: dict, path: str) -> None:
    """Estimated vs true change of the target loss from θ* (the fine-tunes are short, so the
    changes, not the levels, show how well the estimates track them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = fidelity["rows"]
    base = float(fidelity.get("theta_star_loss", 0.0))
    true = np.array([r["true_loss"] for r in rows]) - base
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    for key, marker in (("linearized_loss", "o"), ("exact_loss", "s")):
        if key in rows[0]:
            est = np.array([r[key] for r in rows]) - base
            ax.scatter(true, est, marker=marker, alpha=0.8, label=key.replace("_loss", ""))
    lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("true change of target loss (fine-tuned from θ*)")
    ax.set_ylabel("estimated change")
    scale = (fidelity.get("settings") or {}).get("scale")
    ax.set_title(f"{len(rows)} subsets, surrogate.scale = {scale}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_clusters(selection: dict, path: str) -> None:
    """Each unit's score (with its 95% interval) against its number of samples, kept ones marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.array(selection["groups"]["sizes"], float)
    scores = np.array(selection["scores"], float)
    lo, hi = np.array(selection["ci_low"], float), np.array(selection["ci_high"], float)
    kept = np.array([s in selection["selected"] for s in selection["sources"]])
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for mask, color, label in ((kept, "#2ca02c", "kept"), (~kept, "#7f7f7f", "not kept")):
        if mask.any():
            ax.errorbar(sizes[mask], scores[mask],
                        yerr=[scores[mask] - lo[mask], hi[mask] - scores[mask]], fmt="o",
                        color=color, ms=4, lw=0.8, capsize=2, label=label)
    for x, y, name in zip(sizes, scores, selection["sources"]):
        if np.isfinite(y):
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    missing = int(np.sum(~np.isfinite(scores)))
    ax.set_xlabel("samples in the unit")
    ax.set_ylabel("ensemble score (higher is better)")
    ax.set_title(f"{len(scores)} units" + (f"; {missing} in no sampled subset (no score, not "
                                            "shown)" if missing else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
