"""``crome trace``: causal tracing (``crome.editing.locate``) over the facts a model knows, as
a heatmap per kind of activation, the effects at the last subject token, and their table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .output import _g, _plt, _write


def causal_trace(lm, facts, out_dir: Path, n: int = 20, seed: int = 0, window: int = 10,
                 scan: int = 300, chosen_layer: dict | None = None) -> dict:
    """Trace the first ``n`` of the first ``scan`` facts that the model predicts (its top token
    is the answer's first token); plot the mean indirect effects."""
    from ..editing.locate import GROUPS, KINDS, by_group, trace_fact
    from ..scoring.measure import score_targets

    pool = facts[:scan]
    scores = score_targets(lm, [(f.prompt, f.answer) for f in pool])
    known = [f for f, s in zip(pool, scores) if s.hits[0]][:n]
    if not known:
        raise ValueError("the model predicts none of the scanned facts")
    traces = [trace_fact(lm, f.prompt, f.subject, f.answer, seed=seed, window=window) for f in known]
    L = lm.num_layers
    mean = {k: [[float(np.nanmean([by_group(t)[k][g][layer] for t in traces])) for layer in range(L)]
                for g in range(len(GROUPS))] for k in KINDS}
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    titles = {"hidden": "hidden state (single layer)", "mlp": f"MLP output (window {window})",
              "attn": f"attention output (window {window})"}
    cmaps = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    for ax, k in zip(axes, KINDS):
        im = ax.imshow(np.array(mean[k]), aspect="auto", cmap=cmaps[k])
        ax.set(yticks=range(len(GROUPS)), yticklabels=GROUPS, xlabel="layer", title=f"Restoring the {titles[k]}")
        fig.colorbar(im, ax=ax, label="mean indirect effect")
    fig.tight_layout()
    fig.savefig(out_dir / "trace_heatmap.png", dpi=110)
    plt.close(fig)
    last = GROUPS.index("last subject token")
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in KINDS:
        ax.plot(range(L), mean[k][last], label=titles[k])
    if chosen_layer is not None:
        ax.axvline(chosen_layer["layer"], color="k", ls=":", lw=1,
                   label=f"edited layer {chosen_layer['layer']} ({chosen_layer['rule']})")
    ax.set(xlabel="layer", ylabel="mean indirect effect at the last subject token",
           title=f"Causal trace over {len(traces)} known facts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "trace_last_subject.png", dpi=110)
    plt.close(fig)
    mlp_last = mean["mlp"][last]
    peak = int(np.nanargmax(mlp_last))
    rows = [[str(layer)] + [_g(mean[k][last][layer]) for k in KINDS] for layer in range(L)]
    data = dict(n_facts=len(traces), scanned=len(pool), seed=seed, window=window, noise_scale=3.0,
                mlp_peak_layer_last_subject=peak, mean_effect=mean, chosen_layer=chosen_layer,
                p_clean=float(np.mean([t.p_clean for t in traces])),
                p_corrupted=float(np.mean([t.p_corrupted for t in traces])),
                facts=[dict(prompt=t.prompt, subject=t.subject, answer=t.answer, p_clean=t.p_clean,
                            p_corrupted=t.p_corrupted) for t in traces],
                plots=["trace_heatmap.png", "trace_last_subject.png"])
    return _write(out_dir, "trace", data, ["layer", "hidden", "MLP", "attention"], rows)
