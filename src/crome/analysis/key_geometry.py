"""``crome analyze keys``: k^u, k̄, C⁻¹k̄ and the prefixed keys of each subject, in 2-D (PCA, t-SNE)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from ..editing.context import RunContext
from .output import _g, _plt, _write

KIND_COLOURS = {"k^u, first-token subject": "tab:red", "k^u, other subject": "tab:orange",
                "k̄ (mean over prefixes)": "tab:blue", "prefixed key": "tab:grey", "C⁻¹k̄": "tab:green"}


def _plot_keys(p, kinds: list[str], title: str, path: Path) -> None:
    """A 2-D projection of the keys, coloured by kind."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, colour in KIND_COLOURS.items():
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            ax.scatter(p[idx, 0], p[idx, 1], s=9 if kind == "prefixed key" else 22, c=colour, label=kind,
                       alpha=0.5 if kind == "prefixed key" else 0.9)
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def key_geometry(lm, cases, ctx: RunContext, out_dir: Path) -> dict:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from ..editing.compute_key import compute_keys

    layer, templates, seed = ctx.hparams.layer, ctx.templates, ctx.settings.seed
    mom2 = ctx.stats.mom2 if ctx.stats is not None else None
    vectors, kinds, owners, per_case = [], [], [], []
    for case in cases:
        keys = compute_keys(lm, case.request, layer, templates)
        first = keys.first_token_subject
        c_inv_k = torch.linalg.solve(mom2.to(keys.k_mean), keys.k_mean) if mom2 is not None else keys.k_mean
        sampled = keys.keys[1:] if len(keys.keys) > 1 else keys.keys  # drop the bare "{}" template
        rows = [(keys.k_bare, "k^u, first-token subject" if first else "k^u, other subject"),
                (keys.k_mean, "k̄ (mean over prefixes)")]
        if mom2 is not None:
            rows.append((c_inv_k, "C⁻¹k̄"))
        rows += [(k, "prefixed key") for k in sampled]
        for v, kind in rows:
            vectors.append(v.cpu().numpy())
            kinds.append(kind)
            owners.append(case.case_id)
        cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
        per_case.append(dict(case_id=case.case_id, first_token_subject=first,
                             cos_bare_mean=cos(keys.k_bare, keys.k_mean),
                             cos_bare_prefixed=float(np.mean([cos(keys.k_bare, k) for k in sampled])),
                             norm_bare=float(keys.k_bare.norm()), norm_mean=float(keys.k_mean.norm()),
                             norm_prefixed=float(sampled.norm(dim=1).mean()),
                             denominator_rome=float(keys.k_bare @ (c_inv_k / c_inv_k.norm())),
                             denominator_crome=float(keys.k_mean @ (c_inv_k / c_inv_k.norm()))))
    x = np.stack(vectors)
    xs = (x - x.mean(0)) / (x.std(0) + 1e-8)
    proj = {"pca": PCA(n_components=2, random_state=seed).fit_transform(xs)}
    if len(x) > 5:
        proj["tsne"] = TSNE(n_components=2, random_state=seed, init="pca",
                            perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(xs)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, p in proj.items():
        _plot_keys(p, kinds, f"Keys at layer {layer}, {name.upper()}", out_dir / f"keys_{name}.png")
    np.savez_compressed(out_dir / "keys.npz", vectors=x, kinds=np.array(kinds), owners=np.array(owners))

    groups = {"first-token subject": [c for c in per_case if c["first_token_subject"]],
              "other subject": [c for c in per_case if not c["first_token_subject"]]}
    stats = ("cos_bare_mean", "cos_bare_prefixed", "norm_bare", "norm_prefixed", "denominator_rome",
             "denominator_crome")
    summary, rows = {}, []
    for g, cs in groups.items():
        summary[g] = {s: statistics.mean([c[s] for c in cs]) if cs else None for s in stats} | {"n": len(cs)}
        rows.append([g, str(len(cs))] + [_g(summary[g][s]) if cs else "-" for s in stats])
    data = dict(layer=layer, seed=seed, mom2=mom2 is not None, context_templates=templates, cases=per_case,
                summary=summary, plots=[f"keys_{n}.png" for n in proj])
    return _write(out_dir, "key_geometry", data, ["subjects", "n", "mean cos(k^u, k̄)", "mean cos(k^u, prefixed)",
                                                  "‖k^u‖", "‖prefixed‖", "k^u·û (ROME denominator)",
                                                  "k̄·û (C-ROME)"], rows)
