"""Where a sequential memory run's entries fire: on the ME-PPL texts, and on the earlier edits' prompts.

Rebuilds the memory of a ``lifelong.py`` memory run from its checkpoint (the first ``--upto`` edits,
entries as stored), then runs the perplexity texts and every kept edit's bare prompt through the model
with the gate recording, per entry, the positions where it is the best match at or above the threshold:
an entry that fires on ordinary text, or on another edit's prompt at a position that is not that
edit's subject, is what moves perplexity and retained efficacy.

    python benchmarks/memory_firing.py --run runs/lifelong/B/memory+mpes+t6+lr1.jsonl --upto 650 [--exact-below 0]
    python benchmarks/memory_firing.py --run runs/lifelong/B/memory+mpes+t6+lr1.jsonl --upto 3000 --precision
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from benchlib import DATA, emit


def rebuilt(lm, run: Path, upto: int, threshold: float, exact_below: int | None):
    """The run's memory after its first ``upto`` edits, and (subject, prompt) of each kept entry by number.
    Each key's threshold as stored, or, for a run made before keys had their own (or with ``exact_below``
    given), ``memory.key_thresholds`` with ``threshold`` and that ``memory_exact_below``."""
    from dataclasses import replace

    from crome.editing.memory import key_thresholds
    from crome.editing.mom2 import stats_for
    from crome.evaluation.checkpoint import FactorStore
    from crome.evaluation.jobs import EvalJob, model_setup
    from crome.request import EditRequest

    records = [json.loads(x) for x in run.read_text().splitlines()][:upto]
    job = EvalJob(data="x", out="", method="memory", layer=records[0]["layer"])   # C as the run had it
    hp, _, stats = model_setup(lm, job)
    hp = replace(hp, memory_threshold=threshold,
                 memory_exact_below=hp.memory_exact_below if exact_below is None else exact_below)
    from crome.editing.memory import EditMemory

    memory = EditMemory.from_stats(stats or stats_for(lm, hp), threshold)
    store, owners = FactorStore(run), {}
    by_id = {r["case_id"]: r for r in records}
    for n in range(1, upto + 1):
        update = store.read(n)
        if update.get("entry"):
            e, r = update["entry"], by_id[update["case_ids"][0]]
            thresholds = e.get("thresholds") if exact_below is None else None
            if thresholds is None:
                request = EditRequest.create(r["prompt"].replace(r["subject"], "{}", 1), r["subject"], r["target_new"])
                thresholds = key_thresholds(lm.tokenizer, request, hp)
            memory.add(int(e["number"]), e["keys"], e["value"], thresholds)
            owners[int(e["number"])] = (r["subject"], r["prompt"], r["first_token_subject"])
    return memory, owners


def firing(lm, memory, texts: list[str]) -> list[tuple[int, int, int, str]]:
    """(text, position, entry number, token) of every position where the gate fires."""
    fired = []
    for t, text in enumerate(texts):
        ids = torch.tensor([lm.tokenizer(text)["input_ids"][:512]], device=lm.device)
        seen = {}

        def spy(_module, args, _output):
            fire, owner = memory.gate(args[0])
            seen["fire"], seen["owner"] = fire[0].cpu(), owner[0].cpu()

        handle = lm.mlp_out(memory.layer).register_forward_hook(spy)
        try:
            with torch.no_grad():
                lm.model(input_ids=ids)
        finally:
            handle.remove()
        for p in torch.nonzero(seen["fire"]).flatten().tolist():
            fired.append((t, p, memory.numbers[int(seen["owner"][p])], lm.tokenizer.decode(ids[0, p])))
    return fired


def precision(lm, memory, texts: list[str]) -> dict:
    """The gate in float32 (what a float32 model's forward uses) against float64 at every position of
    ``texts``: the positions where they decide differently (fire or not, or another entry), and the gate's
    seconds per forward in each, timed on the same inputs in one run."""
    import time

    got = dict(positions=0, differ=0, seconds={"float32": 0.0, "float64": 0.0})

    def spy(_module, args, _output):
        decided = {}
        for dtype in (torch.float32, torch.float64):
            start = time.perf_counter()
            decided[dtype] = memory.gate(args[0].to(dtype))
            got["seconds"][str(dtype).split(".")[1]] += time.perf_counter() - start
        (f32, o32), (f64, o64) = decided[torch.float32], decided[torch.float64]
        got["positions"] += f32.numel()
        got["differ"] += int(((f32 != f64) | (f32 & f64 & (o32 != o64))).sum())

    handle = lm.mlp_out(memory.layer).register_forward_hook(spy)
    try:
        for text in texts:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([lm.tokenizer(text)["input_ids"][:512]], device=lm.device))
    finally:
        handle.remove()
    got["seconds_per_forward"] = {k: round(v / len(texts), 5) for k, v in got.pop("seconds").items()}
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--upto", type=int, required=True)
    ap.add_argument("--threshold", type=float, default=0.85)
    ap.add_argument("--exact-below", type=int, default=None,
                    help="memory_exact_below for every key (0: none needs the exact threshold); default: as stored")
    ap.add_argument("--ppl-data", default=str(DATA / "me-ppl" / "ME-PPL_50.json"))
    ap.add_argument("--precision", action="store_true",
                    help="Compare the gate in float32 with float64 instead: decisions and seconds, same inputs.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from crome.evaluation.jobs import EvalJob, load
    from crome.scoring.texts import load_texts

    lm = load(EvalJob(data="x", out=""), progress=False)
    memory, owners = rebuilt(lm, Path(args.run), args.upto, args.threshold, args.exact_below)
    texts = load_texts(args.ppl_data)
    prompts = [(n, prompt.replace("{}", subject)) for n, (subject, prompt, _) in owners.items()]
    if args.precision:
        emit(dict(run=args.run, upto=args.upto, stored=len(memory), ppl_texts=precision(lm, memory, texts),
                  prompts=precision(lm, memory, [p for _, p in prompts])), args.out)
        return
    on_text = firing(lm, memory, texts)
    on_prompts = firing(lm, memory, [p for _, p in prompts])
    foreign = [(prompts[t][0], p, n, tok) for t, p, n, tok in on_prompts if n != prompts[t][0]]
    count = collections.Counter(n for _, _, n, _ in on_text)
    steals = collections.Counter(n for _, _, n, _ in foreign)
    top = sorted(set(count) | set(steals), key=lambda n: -(count[n] + steals[n]))[:15]
    emit(dict(run=args.run, upto=args.upto, threshold=args.threshold, exact_below=args.exact_below, stored=len(memory),
              ppl_positions=sum(len(lm.tokenizer(t)["input_ids"][:512]) for t in texts),
              ppl_positions_fired=len(on_text), prompts=len(prompts),
              prompts_with_foreign_entry=len({t for t, *_ in foreign}),
              top=[dict(number=n, subject=owners[n][0], prompt=owners[n][1], first_token=owners[n][2],
                            fires_on_ppl_positions=count[n], fires_on_other_prompts=steals[n],
                            tokens=collections.Counter(tok for _, _, m, tok in on_text + foreign if m == n).most_common(5))
                       for n in top]), args.out)


if __name__ == "__main__":
    main()
