"""Where the gated memory's threshold goes: how similar W's input is, in the gate's metric, to the keys
of the edit it should fire for, and to every stored key where it should not.

For ``--n`` counterfact cases on the default model (the edit layer, crome's key statistics), each
case's memory keys are its bare key k^u and its template-mean key k̄ (``editing/memory.py``). Then:

* should fire: the subject's last token in the bare prompt, after the fixed test prefix, and in
  each paraphrase (the case's own keys);
* should not fire: every position of the ME-PPL_50 texts, the subject's last token of each
  neighbourhood prompt (another subject, same relation), and the edit prompt's other positions
  (against every stored key).

For each threshold the share of each group at or above it; first-token subjects apart.

    python benchmarks/memory_gate.py --n 100 --out docs/results/memory/gate.json
"""

from __future__ import annotations

import argparse

import torch
from benchlib import DATA, emit

GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def subject_key(lm, layer: int, text: str, subject: str, target: str):
    """W's input at the subject's last token of ``text`` (None when the subject is not in it)."""
    from crome.editing.compute_key import keys_at
    from crome.request import EditRequest

    try:
        request = EditRequest.create(text, subject, target)
        keys, _ = keys_at(lm, request, layer, ["{}"])
    except Exception:   # noqa: BLE001 - a paraphrase without the subject is skipped
        return None
    return keys[0]


def all_keys(lm, layer: int, texts: list[str]) -> torch.Tensor:
    from crome.hooks import run_until
    from crome.request import pad_right

    rows = []
    for text in texts:
        ids, mask = pad_right([lm.tokenizer(text, truncation=True, max_length=256)["input_ids"]],
                              lm.tokenizer.pad_token_id, lm.device)
        rec = run_until(lm.model, lm.mlp_out(layer), input_ids=ids, attention_mask=mask)
        rows.append(rec.input[0].float())
    return torch.cat(rows)


def shares(sims: list[float]) -> dict:
    t = torch.tensor(sims)
    return {str(x): round(float((t >= x).float().mean()), 4) for x in GRID} | {"n": len(sims)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-val.json"))
    ap.add_argument("--ppl-data", default=str(DATA / "me-ppl" / "ME-PPL_50.json"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import transformers

    from crome.editing.api import resolved
    from crome.editing.compute_key import compute_keys
    from crome.editing.memory import EditMemory
    from crome.editing.mom2 import stats_for
    from crome.evaluation.datasets import load_cases
    from crome.models import load_model
    from crome.scoring.measure import choose_test_prefix
    from crome.scoring.texts import load_texts

    transformers.utils.logging.set_verbosity_error()
    lm = load_model(progress=False)
    hp, _, templates = resolved(lm)
    memory = EditMemory.from_stats(stats_for(lm, hp), 0.0)
    prefix = choose_test_prefix("fixed", templates)
    cases = load_cases(args.data).cases[: args.n]
    stored, owners, firsts = [], [], []
    for i, case in enumerate(cases):
        keys = compute_keys(lm, case.request, hp.layer, templates)
        stored += [keys.k_bare, keys.k_mean]
        owners += [i, i]
        firsts.append(keys.first_token_subject)
    table = memory.normalised(torch.stack(stored))
    owners = torch.tensor(owners)

    def own(i, key):
        return float((memory.normalised(key) @ table[owners == i].T).max())

    def anyone(keys):
        return (memory.normalised(keys) @ table.T).max(-1).values.tolist()

    fire = {"bare": [], "prefixed": [], "paraphrase": []}
    fire_first = {"bare": [], "prefixed": [], "paraphrase": []}
    quiet = {"neighbourhood": [], "me_ppl": anyone(all_keys(lm, hp.layer, load_texts(args.ppl_data)))}
    for i, case in enumerate(cases):
        r = case.request
        group = fire_first if firsts[i] else fire
        for name, text in (("bare", r.text()), ("prefixed", f"{prefix} {r.text()}")):
            key = subject_key(lm, hp.layer, text, r.subject, r.target_new)
            if key is not None:
                group[name].append(own(i, key))
        for p in case.paraphrase_prompts:
            key = subject_key(lm, hp.layer, p, r.subject, r.target_new)
            if key is not None:
                group["paraphrase"].append(own(i, key))
        quiet["neighbourhood"] += anyone(all_keys(lm, hp.layer, case.neighborhood_prompts))
    result = dict(model=lm.name, layer=hp.layer, n=len(cases), first_token_subjects=sum(firsts), grid=GRID,
                  should_fire={k: shares(v) for k, v in fire.items()},
                  should_fire_first_token={k: shares(v) for k, v in fire_first.items()},
                  should_not_fire={k: shares(v) for k, v in quiet.items()})
    emit(result, args.out)


if __name__ == "__main__":
    main()
