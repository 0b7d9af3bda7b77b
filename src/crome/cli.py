"""The ``crome`` command, a thin layer over the library: ``edit``, ``demo``, ``eval``, ``summarize``,
``analyze``, ``trace``, ``sweep`` and ``report``. Each command turns its flags into the library's
records (``EvalJob``, ``LoadOptions``), calls one library function and prints what it returns.

Errors print one line and exit with code 2 (no traceback unless ``--debug``); a guard that
refuses or rolls back an edit exits with code 3.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .editing.methods import (
    BATCH_METHODS,
    DEFAULT_METHOD,
    GUARD_ACTIONS,
    METHODS,
    REFERENCE_METHOD,
    SINGLE_METHODS,
    method,
)
from .editing.records import GuardRefused
from .editing.verify import VERIFY_THRESHOLD
from .errors import CromeError
from .models import DTYPES
from .scoring.readings import OPTIONAL_READINGS

out = Console()
err = Console(stderr=True)


def _quiet_transformers() -> None:
    """transformers' and huggingface_hub's own lines (warnings, retries, progress bars) stay out of
    crome's output: a failure becomes crome's one-line error."""
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


LOAD_OPTIONS = ("dtype", "device_map", "trust_remote_code", "allow_pickle")


def _load(model: str | None, options):
    """The model, loaded with ``options`` (a ``LoadOptions``), behind a spinner (with the gated memory a
    saved edited model carries, ``memory.attach_saved``)."""
    from .editing.memory import attach_saved
    from .models import load_model

    _quiet_transformers()
    with err.status(f"loading {model or 'the default model'}"):
        lm = load_model(model, **options.kwargs())
        attach_saved(lm, model)
        return lm


def _load_options(o: dict):
    """The model-loading flags of a command, taken out of its options, as a ``LoadOptions``."""
    from .models import LoadOptions

    return LoadOptions(**{k: o.pop(k) for k in LOAD_OPTIONS})


def _say(message: str) -> None:
    err.print(f"[dim]{message}[/]", highlight=False)


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


ROWS = [
    ("denominator k_cur·u", "denominator"), ("numerator ‖v*−v_cur‖", "numerator_norm"),
    ("update ‖ΔW‖", "update_norm"), ("‖ΔW‖/‖W‖", "update_ratio"), ("cos(k^u, k̄)", "cos_bare_mean"),
    ("subject is first token", "first_token_subject"), ("perplexity before", "ppl_before"),
    ("perplexity after", "ppl_after"), ("perplexity ratio", "ppl_ratio"), ("collapsed", "collapsed"),
    ("P(target) before", "p_target_before"), ("P(target) after", "p_target_after"),
    ("P(target) before, prefixed", "p_target_before_prefixed"),
    ("P(target) after, prefixed", "p_target_after_prefixed"), ("edit seconds", "edit_seconds"),
]


def report_table(reports: list[dict], titles: list[str], title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("")
    for t in titles:
        table.add_column(t, justify="right")
    for label, key in ROWS:
        cells = []
        for r in reports:
            cell = _fmt(r[key])
            if key == "collapsed" and r[key]:
                cell = f"[bold red]{cell}[/]"
            cells.append(cell)
        table.add_row(label, *cells)
    return table


class _Main(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # one line, exit 2
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            label = "" if isinstance(exc, CromeError) else f"{type(exc).__name__}: "
            err.print(f"[red]error:[/] {escape(label + msg)}", highlight=False, soft_wrap=True)   # "[ui]" stays
            sys.exit(getattr(exc, "exit_code", 2))


@click.group(cls=_Main)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def main(ctx, debug):
    """crome: ROME and C-ROME fact edits that don't collapse the model."""
    ctx.obj = {"debug": debug}


def _options(f, options):
    """Apply click options so that --help lists them in the order given."""
    for option in reversed(options):
        f = option(f)
    return f


def _model_opts(f):
    """The flags every command that loads a model shares: model, layer, seed, key statistics."""
    return _options(f, [
        click.option("--model", default=None,
                     help="HF id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)."),
        click.option("--layer", default=None,
                     help="Layer to edit: an index, 'auto' (causal trace), or 'depth' (20%); default: the model's "
                          "table entry, else auto."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for the context templates."),
        click.option("--no-mom2", is_flag=True, help="No key statistics (C = I): the 'Fall of ROME' paper's setting."),
        click.option("--mom2-corpus", default=None,
                     help="Text for the key statistics C (default: text sampled from the model itself)."),
        click.option("--mom2-samples", type=int, default=None, help="Keys in the statistics (default 20000)."),
        click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto",
                     show_default=True,
                     help="Weights' dtype; auto: float32 on CPU, bfloat16 on a GPU for models over 1B parameters. "
                          "v* and the update are computed in float32 (float64 for a float64 model)."),
        click.option("--device-map", type=click.Choice(["auto"]), default=None,
                     help="auto: spread a model too large for one GPU over all of them (accelerate)."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Run Python code shipped with the model (off: only built-in architectures)."),
        click.option("--allow-pickle", is_flag=True,
                     help="Load pickle (.bin) weights; off: safetensors only."),
    ])


def _common(f):
    f = click.option("--ppl-data", default=None,
                     help="Texts for perplexity (ME-PPL JSON or one passage a line); default: the bundled corpus, "
                          "or $CROME_PPL_DATA.")(f)
    return _model_opts(f)


def _guard_opts(f, default="off"):
    """The guard's flags; ``crome edit`` verifies by default, ``eval`` measures every edit anyway."""
    return _options(f, [
        click.option("--guard", type=click.Choice(GUARD_ACTIONS), default=default, show_default=True,
                     help="verify: apply, measure probe perplexity, roll back above the threshold (exit 3); fallback: "
                          "the same, then C-ROME; refuse: the calibrated rule's prediction, weights untouched."),
        click.option("--guard-threshold", type=float, default=VERIFY_THRESHOLD, show_default=True,
                     help="Largest probe perplexity ratio verify accepts."),
        click.option("--guard-rule", default=None, type=click.Path(dir_okay=False),
                     help="Rule file from `crome analyze guard` (a cheap pre-check)."),
        click.option("--guard-probe", default=None, help="Probe texts for verify (default: the bundled passages)."),
        click.option("--guard-efficacy/--no-guard-efficacy", default=True, show_default=True,
                     help="verify/fallback also roll back an edit that did not take: P(new target) on its prompt "
                          "(after the test prefix, for C-ROME) must rise and end above P(old target)."),
    ])


def _lifelong_opts(f):
    """The options for long runs of edits (hyper-parameters: recorded with every result)."""
    return _options(f, [
        click.option("--mpes", is_flag=True,
                     help="Stop the v* optimisation once the target is the most probable token on every prompt "
                          "(ENCORE's MPES)."),
        click.option("--v-lr", type=float, default=None,
                     help="The v* optimisation's Adam step size (default 0.5; the gated memory's long runs use 1.0: "
                          "fewer steps, docs/SPEED.md)."),
        click.option("--templates", "n_templates", type=int, default=None,
                     help="Context templates of the v* optimisation and k-bar: the bare prompt and N-1 sampled ones of "
                          "5 tokens, N = 1 + a multiple of 5 (default 21: 10 of 5 and 10 of 10 tokens; MEMIT's "
                          "reference uses 6)."),
        click.option("--nas", is_flag=True,
                     help="MEMIT/AlphaEdit: rescale every value vector v* to the mean norm of trial v*s on the "
                          "unedited model, and skip an outlier (over 2x): NAS, norm-anchor scaling."),
        click.option("--norm-weight", type=float, default=None,
                     help="MEMIT/AlphaEdit: bound the update's norm, a ridge mu*mean(eig C)*I in the solve "
                          "(ENCORE; default 0: off)."),
        click.option("--null-space-energy", type=float, default=None,
                     help="AlphaEdit: the share of the key statistics' energy an update may touch (default 0.2)."),
        click.option("--alphaedit-l2", type=float, default=None,
                     help="AlphaEdit: the solve's lambda, in units of C's mean eigenvalue (default 10)."),
    ])


def _guard_opts_verify(f):
    return _guard_opts(f, default="verify")


def _writable(path: str | None) -> None:
    """Check an output path before any work: its folder is created, a folder in its place is an error."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise CromeError(f"output path is a folder: {path}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CromeError(f"cannot create the folder for {path}: {exc.strerror}") from None
    if not os.access(p.parent, os.W_OK):
        raise CromeError(f"cannot write to {p.parent}")


def _job(o: dict, **fixed):
    """The command's options as an ``EvalJob`` (``crome edit`` and ``demo`` name no data or results
    file): the one place flags become a run's options, and ``check_options`` runs on them."""
    from .evaluation.jobs import EvalJob

    o = dict(o)
    memit = o.pop("memit_layers", None)
    fields = dict(model=o.pop("model", None), layer=o.pop("layer", None), seed=o.pop("seed", 0),
                  mom2=not o.pop("no_mom2", False), mom2_corpus=o.pop("mom2_corpus", None),
                  mom2_samples=o.pop("mom2_samples", None), ppl_data=o.pop("ppl_data", None),
                  hparams=_hparams(o, memit), **_load_options(o).kwargs())
    for name in ("method", "guard", "guard_threshold", "guard_rule", "guard_probe", "guard_efficacy"):
        if name in o:
            fields[name] = o[name]
    return EvalJob(**{**dict(data="", out=""), **fields, **fixed})


def _hparams(o: dict, memit: str | None) -> dict:
    """The hyper-parameters the flags override (those given)."""
    from .editing.hparams import few_templates

    given = {name: o.pop(name, None) for name in ("mpes", "nas", "norm_weight", "null_space_energy", "alphaedit_l2",
                                                  "v_lr")}
    if memit:
        given["memit_layers"] = _layers(memit)
    n_templates = o.pop("n_templates", None)
    if n_templates is not None:
        given["template_lengths"] = few_templates(n_templates)
    return {k: v for k, v in given.items() if v not in (None, False)}


def _context(job, checks: bool = True, ppl: bool = True):
    """Load the job's model and prepare its run: (lm, ``RunContext``); with ``checks``, its guard
    and perplexity monitor too (``ppl=False``: no perplexity)."""
    from .evaluation.jobs import prepare, with_checks
    from .scoring.texts import load_texts, perplexity_source

    texts = load_texts(perplexity_source(job.ppl_data)) if ppl else None   # read before the model loads
    lm = _load(job.model, job.load_options)
    ctx = prepare(lm, job, status=err.status, say=_say, texts=texts)
    return lm, with_checks(lm, ctx, job, status=err.status) if checks else ctx


def _writable_folder(path: str | None, flag: str) -> None:
    if path and Path(path).is_file():
        raise CromeError(f"{flag} names a file, not a folder: {path}")


@main.command()
@click.option("--prompt", default=None, help='Prompt with "{}" for the subject, or with the subject written out.')
@click.option("--subject", default=None)
@click.option("--target", "target_new", default=None, help="The new target.")
@click.option("--target-true", default=None, help="The old target (recorded).")
@click.option("--requests", "requests_file", default=None, type=click.Path(dir_okay=False),
              help="MEMIT: a JSON list (or JSON lines) of {prompt, subject, target_new}, edited as one update.")
@click.option("--method", type=click.Choice(tuple(METHODS)), default=DEFAULT_METHOD, show_default=True)
@click.option("--memit-layers", default=None, help="MEMIT's layers, e.g. 4-8 (default: five centred on --layer).")
@_common
@click.option("--no-ppl", is_flag=True, help="Skip the perplexity report (the guard's probe still runs).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--out", "out_path", default=None, help="Also write the JSON result to this file.")
@click.option("--save", "save_dir", default=None, help="Save the edited model (Hugging Face format) here.")
@_guard_opts_verify
@_lifelong_opts
def edit(**o):
    """Edit one fact (or, with MEMIT, a file of them), check it (the guard), and report what it did to the model."""
    from .evaluation.report import edit_and_report, refused_record
    from .scoring.texts import perplexity_source

    requests = _edit_requests(o)
    job = _job(o)
    _writable(o["out_path"])
    _writable_folder(o["save_dir"], "--save")
    lm, ctx = _context(job, ppl=not o["no_ppl"])
    ppl_name = None if o["no_ppl"] else str(perplexity_source(job.ppl_data))
    doing = (f"{job.method}: {len(requests)} facts over layers {', '.join(map(str, ctx.layers(lm.num_layers)))}"
             if len(requests) > 1 or method(job.method).batch else
             f"{job.method}: computing the edit at layer {ctx.hparams.layer} and measuring it")
    with err.status(doing):
        try:
            report, computed = edit_and_report(lm, requests, ctx, ppl_data=ppl_name, keep=bool(o["save_dir"]))
        except GuardRefused as refused:   # still one line: what the diagnostics said joins the error
            diagnostics = getattr(refused.edit, "diagnostics", None)
            why = diagnostics.unlikely_to_take() if diagnostics is not None else None
            if why:
                refused = GuardRefused(f"{refused}; the diagnostics said it was unlikely to take: {why}",
                                       refused.edit, refused.decision)
            if o["as_json"]:                  # a script reads why, and how far P(target) got
                click.echo(json.dumps(refused_record(refused, requests, ctx), indent=2))
            raise refused from None
    _warn_unlikely(computed)
    _edit_output(lm, requests, report, o, ctx.memory)


def _edit_requests(o: dict) -> list:
    """The facts ``crome edit`` was given: --prompt/--subject/--target, or a --requests file (MEMIT)."""
    from .request import requests_from_input

    listed = Path(o["requests_file"]) if o["requests_file"] else None
    return requests_from_input(o["prompt"], o["subject"], o["target_new"], o["target_true"], listed=listed,
                               batch=method(o["method"]).batch, batch_methods=BATCH_METHODS)


def _edit_output(lm, requests, report, o: dict, memory=None) -> None:
    """Write, save and print what ``crome edit`` did (a memory edit: the memory saved beside the weights)."""
    from .editing.memory import MEMORY_FILE
    from .evaluation.report import BatchReport
    from .models import save_model

    result = report.to_dict()
    if o["out_path"]:
        Path(o["out_path"]).write_text(json.dumps(result, indent=2))
    if o["save_dir"]:
        if not report.applied:
            raise CromeError("non-finite update: nothing to save")
        save_model(lm, o["save_dir"])
        if memory is not None and len(memory):
            memory.save(Path(o["save_dir"]) / MEMORY_FILE)
    if o["as_json"]:
        click.echo(json.dumps(result, indent=2))
        return
    if isinstance(report, BatchReport):
        _print_batch(lm, requests, report)
    else:
        request = requests[0]
        out.print(report_table([result], [report.method],
                               title=f"{request.text()} → {request.target_new}  ({lm.name}, layer {report.layer})"))
        out.print(_readings_table(result.get("readings")))
        out.print(f"[dim]{_settings_line(result)}[/]")
    if o["save_dir"]:
        out.print(f"edited model saved to {o['save_dir']}")


def _readings_table(readings: dict | None) -> Table | str:
    """Where users look: the edit's prompt read in four places, before and after (``scoring.readings``)."""
    from .scoring.readings import readings_rows

    if not readings:
        return ""
    table = Table(title="where users look")
    for name in ("", "before", "after"):
        table.add_column(name, justify="left" if not name else "right", overflow="fold")
    for row in readings_rows(readings):
        table.add_row(*row)
    return table


def _warn_unlikely(edit) -> None:
    """One line when the edit's diagnostics say it is unlikely to take (``Diagnostics.unlikely_to_take``)."""
    diagnostics = getattr(edit, "diagnostics", None)     # a MEMIT batch has none
    why = diagnostics.unlikely_to_take() if diagnostics is not None else None
    if why:
        err.print(f"[yellow]warning:[/] the edit at layer {edit.layer} is unlikely to take: {why}", highlight=False,
                  soft_wrap=True)


def _print_batch(lm, requests, report) -> None:
    rows = [[r["prompt"].replace("{}", r["subject"]), r["target_new"], f"{r['p_target_before']:.3g}",
             f"{r['p_target_after']:.3g}"] for r in report.requests]
    _print_table(["prompt", "target", "P before", "P after"], rows,
                 title=f"{report.method}: {len(requests)} facts, layers {report.layers} ({lm.name})")
    ppl = (f"perplexity {report.ppl_before:.4g} → {report.ppl_after:.4g} (×{report.ppl_ratio:.3g})"
           if report.ppl_ratio is not None else "perplexity not measured")
    conds = ", ".join(f"{k}: {v['condition']:.3g}" for k, v in report.layer_stats.items())
    out.print(f"[dim]{ppl}; ‖ΔW‖/‖W‖ at most {report.update_ratio:.3g}; condition numbers {conds}; "
              f"guard {report.guard} ({report.guard_action})[/]")


def _layers(text: str) -> tuple[int, ...]:
    """'4-8' or '4,6,8' as layer indices."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            return tuple(range(lo, hi + 1))
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise CromeError(f"--memit-layers takes 'FIRST-LAST' or a comma-separated list, not {text!r}") from None


def _settings_line(r: dict) -> str:
    stats = r.get("key_stats")
    c = (f"C from {stats['source']} ({stats['n_keys']} keys, shrinkage {stats['shrinkage']:.3g}, hash {stats['hash']})"
         if stats else "no key statistics (C = I, the paper's setting)")
    choice = r.get("layer_choice") or {}
    guard = r.get("guard", "off")
    if r.get("guard_ppl_ratio") is not None:
        guard += f": probe perplexity ×{r['guard_ppl_ratio']:.4g} ≤ {r['guard_threshold']:g}"
        eff = r.get("guard_efficacy")
        if eff:
            where = " and ".join(eff.get("checked") or [eff.get("place", "bare")])
            took = "took" if r.get("guard_took") else "did not take"
            guard += (f", {took} (checked: {where}): P(target) {eff['place']} "
                      f"{eff['p_new_before']:.3g} → {eff['p_new_after']:.3g}")
        guard += f", {r['guard_action']}"
    return f"layer {r['layer']} ({choice.get('rule', '?')}); {c}; guard {guard}"


@main.command()
@_common
@click.option("--tokens", default=20, show_default=True, help="Tokens generated after each edit.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(**o):
    """ROME, C-ROME and dual (the default) on a first-token subject and a normal one: the collapse and its fixes.

    crome's default settings (key statistics on); --no-mom2 gives the "Fall of ROME" paper's
    setting (C = I). ROME's first-token edit collapses the model in both."""
    from .evaluation.demo import run_demo
    from .scoring.texts import perplexity_source

    tokens, as_json = o.pop("tokens"), o.pop("as_json")
    lm, ctx = _context(_job(o, guard="off"), checks=False)
    stats, ppl_name = ctx.stats, str(perplexity_source(o["ppl_data"]))
    if not as_json:
        setting = (f"key statistics C from {stats.source} ({stats.n_keys} keys): crome's default" if stats else
                   "no key statistics (C = I): the \"Fall of ROME\" paper's setting")
        out.print(f"[bold]Setting:[/] {lm.name}, layer {ctx.hparams.layer} ({ctx.layer_choice.rule}); {setting}; "
                  f"guard off (the demo shows what an unguarded edit does)", highlight=False)
    results = []
    for result in run_demo(lm, ctx, tokens, ppl_name, status=err.status):
        results.append(result)
        if not as_json:
            _print_demo(result)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        out.print(f"[dim]model {lm.name}, perplexity on {ppl_name}, seed {o['seed']}; "
                  f"collapsed = perplexity ratio > 2; "
                  f"{'C = I (paper setting)' if stats is None else 'C from ' + stats.source}[/]")


def _print_demo(result) -> None:
    """One case of ``crome demo``: the methods' reports side by side, then the generations."""
    reports, text, target = [r.to_dict() for r in result.reports], result.request.text(), result.case.target
    out.print(report_table(reports, [r["method"] for r in reports], title=f"{result.case.label}: {text} → {target}"))
    out.print(f"  [dim]unedited:[/] {text}[bold]{result.unedited_generation!r}[/]", highlight=False)
    for r in reports:
        out.print(f"  [dim]{r['method']:>8}:[/] {text}[bold]{r['generation_after']!r}[/]", highlight=False)
    out.print()


@main.command("eval")
@click.option("--data", required=True, help="CounterFact (flat or full schema) or zsRE JSON; a relative name is also "
                                            "looked up under $CROME_DATA.")
@click.option("--method", type=click.Choice(tuple(METHODS)), default=DEFAULT_METHOD, show_default=True,
              help=f"{'/'.join(SINGLE_METHODS)}: one fact per update; {'/'.join(BATCH_METHODS)}: --batch-size facts "
                   f"per update over several layers.")
@_common
@click.option("--n", "n_cases", type=int, default=None, help="The first N cases.")
@click.option("--cases", "case_ids", default=None, help="Comma-separated case ids instead of --n.")
@click.option("--test-prefix", type=click.Choice(["none", "fixed", "random"]), default="fixed", show_default=True,
              help="Also measure every metric with a context prefix at test time: the first context template, or "
                   "one drawn per case.")
@click.option("--out", "out_path", required=True, help="Results, one JSON line per case (appended).")
@click.option("--resume", is_flag=True, help="Continue the run already in --out, skipping finished cases.")
@click.option("--skip-invalid", is_flag=True, help="Skip (and count) malformed records instead of stopping.")
@click.option("--sequential", is_flag=True, help="Let edits accumulate in one model.")
@click.option("--monitor-every", type=int, default=1, show_default=True,
              help="With --sequential: perplexity and retained efficacy every k-th edit.")
@click.option("--retained-every", type=int, default=0, show_default=True,
              help="With --sequential: retained efficacy (which re-scores every edit so far) every k-th edit instead; "
                   "0: with the perplexity. --resume may change both.")
@click.option("--gen-tokens", type=int, default=100, show_default=True,
              help="Tokens sampled per generation prompt for fluency (0: skip).")
@click.option("--markdown", "md_path", default=None, help="Also write the summary table as Markdown.")
@_guard_opts
@click.option("--edits-per-pass", type=int, default=None,
              help="Compute and measure K cases' edits together (batched passes); the records are K = 1's up to "
                   "float rounding. Default: measured per device (2 on CPU, 1 on GPU until measured).")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="MEMIT: edit B cases as one update (measured together; with --sequential, B per update).")
@click.option("--memit-layers", default=None,
              help="MEMIT's layers, e.g. 4-8 or 4,6,8 (default: five centred on --layer).")
@click.option("--workers", type=int, default=None,
              help="Run the cases on N Ray workers (each loads the model once); needs crome[ray].")
@click.option("--ray-address", default=None,
              help="Join a Ray cluster: 'auto' or HOST:PORT (default: start a local Ray).")
@click.option("--threads", type=int, default=None,
              help="Torch threads per worker on CPU (default: the CPUs split evenly).")
@click.option("--retained-sample", type=int, default=0, show_default=True,
              help="With --sequential: retained efficacy on at most N earlier edits, evenly spread over the run "
                   "so far (the same ones at every resume), so that its cost stays flat; 0: every earlier edit.")
@click.option("--scores-every", type=int, default=1, show_default=True,
              help="With --sequential: score the own efficacy (ES/PS/NS before and after, generation EM) of every "
                   "k-th edit only, a sample that keeps long runs cheap; the other edits' records carry none.")
@click.option("--gen-em", is_flag=True,
              help="Also score generation-based exact match: greedy generation after the edit prompt, its "
                   "paraphrases and (with --sequential) every earlier edit's prompt.")
@click.option("--readings", default=",".join(OPTIONAL_READINGS), show_default=True,
              help="Where else each edit is read besides the bare prompt and the test prefix: after a natural "
                   "sentence, through the chat template (with --gen-em); 'none' for neither (a cheaper run).")
@_lifelong_opts
def eval_(**o):
    """Edit, measure and restore each case of a dataset; one JSON line per case, then a summary."""
    from .distribution.run import run_eval
    from .evaluation import summary
    from .evaluation.jobs import cases_of
    from .evaluation.results import ResultsFile

    out_path, md_path, workers = o["out_path"], o.pop("md_path"), o.pop("workers")
    ray_address, threads, case_ids = o.pop("ray_address"), o.pop("threads"), o.pop("case_ids")
    _writable(out_path)
    _writable(md_path)
    run_opts = ("data", "n_cases", "test_prefix", "resume", "skip_invalid", "sequential", "monitor_every",
                "retained_every", "retained_sample", "scores_every", "gen_tokens", "edits_per_pass", "batch_size",
                "gen_em", "readings")
    job = _job(o, out=out_path, case_ids=tuple(case_ids.split(",")) if case_ids else None,
               **{k: o[k] for k in run_opts})
    cases, skipped, dataset_path = cases_of(job)
    if skipped:
        err.print(f"skipped {len(skipped)} invalid records of {dataset_path} (first: {skipped[0]})")
    before, start = len(ResultsFile(out_path).read()), time.perf_counter()
    _quiet_transformers()      # without --workers, the model loads in this process
    records, ctx = run_eval(job, workers, address=ray_address, threads=threads, progress=_progress, status=err.status,
                            say=_say, cases=cases)
    s = ctx.settings
    header, rows = summary.side_by_side([(summary.label(records, out_path), records)])
    _print_table(header, rows, title=f"{s.method} on {s.data}, {s.model}, layer {s.layer} ({ctx.layer_choice.rule}), "
                                     f"key statistics {s.key_stats_source}, {s.dtype}")
    done, seconds = len(records) - before, time.perf_counter() - start
    rate = f"; {done} cases in {seconds:.0f} s, {60 * done / seconds:.1f} cases per minute" if done else ""
    out.print(f"[dim]results: {out_path}{rate}" + (f" on {workers} workers" if workers else "") + "[/]")
    if md_path:
        Path(md_path).write_text(summary.to_markdown(header, rows))


def _progress(items, total, description):
    """A progress bar with ETA on stderr around an iterable."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


def _print_table(header, rows, title=None):
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[c.replace("**", "") for c in r], style="bold" if r[0].startswith("**") else None)
    out.print(table)


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--markdown", "md_path", default=None, help="Write the table as Markdown here.")
@click.option("--csv", "csv_path", default=None, help="Write the table as CSV here.")
def summarize(results, md_path, csv_path):
    """Summaries of eval runs, side by side: results files, or folders of them (a sweep's)."""
    from .evaluation import summary

    paths = []
    for r in results:
        found = summary.result_files(r) if Path(r).is_dir() else [Path(r)]
        if not found:
            raise CromeError(f"{r}: no results files in this folder")
        paths += found
    header, rows = summary.side_by_side(_runs(paths))
    _print_table(header, rows)
    if md_path:
        Path(md_path).write_text(summary.to_markdown(header, rows))
    if csv_path:
        Path(csv_path).write_text(summary.to_csv(header, rows))


@main.group()
def analyze():
    """The "Fall of ROME" analyses; each writes JSON, Markdown and PNG into --out-dir."""


def _runs(paths):
    """(label, records) per eval results file; one-line errors for empty or foreign files."""
    from .evaluation import summary
    from .evaluation.results import ResultsFile

    runs = []
    for path in paths:
        records = ResultsFile(path).read()
        if not records:
            raise CromeError(f"{path}: no results")
        if "case_id" not in records[0] or "method" not in records[0]:
            raise CromeError(f"{path}: not a crome eval results file")
        runs.append((summary.label(records, path), records))
    return runs


def _done(out_dir, name):
    out.print(Path(out_dir, f"{name}.md").read_text())
    out.print(f"[dim]written to {out_dir}: {name}.json, {name}.md and plots[/]")


@analyze.command("update")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out-dir", required=True)
def analyze_update(results, out_dir):
    """Numerator vs denominator per edit, denominator histograms, medians for collapse vs normal."""
    from .analysis.update_anatomy import update_anatomy

    update_anatomy(_runs(results), Path(out_dir))
    _done(out_dir, "update_anatomy")


@analyze.command("keys")
@click.option("--data", required=True)
@click.option("--n", "n_cases", type=int, default=50, show_default=True)
@click.option("--out-dir", required=True)
@_model_opts
def analyze_keys(data, n_cases, out_dir, **o):
    """k^u, k̄, C⁻¹k̄ and prefixed keys per case: PCA and t-SNE, cosine and norm summaries."""
    from .analysis.key_geometry import key_geometry
    from .evaluation import datasets

    cases = datasets.load_cases(data, skip_invalid=True).cases[:n_cases]
    lm, ctx = _context(_job(o), checks=False, ppl=False)
    with err.status(f"keys of {len(cases)} cases"):
        key_geometry(lm, cases, ctx, Path(out_dir))
    _done(out_dir, "key_geometry")


@analyze.command("first-token")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True, help="The dataset the eval run used.")
@click.option("--k", type=int, default=5, show_default=True,
              help="Cases: the collapsed ones, topped up with the smallest denominators.")
@click.option("--out-dir", required=True)
@_common
def analyze_first_token(results, data, k, out_dir, **o):
    """Edit ROME collapse cases again with random text before the subject."""
    from .analysis.first_token import first_token_experiment
    from .evaluation import datasets

    (_, records), = _runs([results])
    cases = {c.case_id: c for c in datasets.load_cases(data, skip_invalid=True).cases}
    if o["layer"] is None:
        o["layer"] = str(records[0].get("layer"))
    lm, ctx = _context(_job(o, method=REFERENCE_METHOD), checks=False)
    ctx = ctx.with_monitor(lm)
    with err.status("ROME edits with the subject first and not first"):
        first_token_experiment(lm, records, cases, ctx, Path(out_dir), k=k)
    _done(out_dir, "first_token")


@analyze.command("prefix")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--out-dir", required=True)
def analyze_prefix(results, out_dir):
    """Efficacy with and without the test-time prefix, by first-token vs other subjects."""
    from .analysis.prefix_effect import prefix_effect

    (_, records), = _runs([results])
    prefix_effect(records, Path(out_dir))
    _done(out_dir, "prefix_effect")


@analyze.command("guard")
@click.option("--calibrate", "calib", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Eval results (ROME) to calibrate on, e.g. from counterfact-train.")
@click.option("--test", "test", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Eval results on other cases, e.g. counterfact-val.")
@click.option("--out-dir", required=True)
def analyze_guard(calib, test, out_dir):
    """Calibrate the collapse guard and report its precision and recall on held-out cases."""
    from .analysis.guard_analysis import guard_analysis

    (_, c), (_, t) = _runs([calib, test])
    guard_analysis(c, t, Path(out_dir))
    _done(out_dir, "guard")


@main.command()
@click.option("--data", required=True, help="Known facts (known_1000.json).")
@click.option("--n", "n_facts", type=int, default=20, show_default=True)
@click.option("--window", type=int, default=10, show_default=True)
@click.option("--out-dir", required=True)
@_model_opts
def trace(data, n_facts, window, out_dir, **o):
    """Causal tracing on known facts: where in the model the fact is recalled.

    --seed seeds the corrupting noise. The layer and key-statistics flags are those of the
    other commands: the layer they choose is marked in the plot (tracing needs no C)."""
    from .analysis.trace_plot import causal_trace
    from .editing.layer_choice import choose_layer
    from .evaluation.datasets import load_knowns

    facts, seed = load_knowns(data), o["seed"]
    lm = _load(o["model"], _load_options(o))
    chosen = choose_layer(lm, o["layer"], seed)
    with err.status(f"tracing {n_facts} facts"):
        causal_trace(lm, facts, Path(out_dir), n=n_facts, seed=seed, window=window, chosen_layer=chosen.record())
    _done(out_dir, "trace")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, help="The folder for the cells' results files (created).")
@click.option("--workers", type=int, default=None, help="Cells run at once (default: one per GPU, else one per CPU).")
@click.option("--ray-address", default=None,
              help="Join a Ray cluster: 'auto' or HOST:PORT (default: start a local Ray).")
@click.option("--threads", type=int, default=None,
              help="Torch threads per cell on CPU (default: the CPUs split evenly).")
def sweep(spec, out_dir, workers, ray_address, threads):
    """A grid of eval runs from a TOML spec, one Ray task per cell; a rerun finishes what is left."""
    from .distribution.sweep import run_sweep
    from .evaluation import summary

    if Path(out_dir).is_file():
        raise CromeError(f"--out is a file: {out_dir}")
    outcomes = run_sweep(spec, out_dir, workers=workers, address=ray_address, threads=threads, say=_say,
                         progress=_progress)
    table = Table(title=f"sweep {spec} → {out_dir}")
    table.add_column("cell")
    table.add_column("outcome")
    for name, outcome in outcomes.items():
        table.add_row(name, f"[red]{outcome}[/]" if outcome.state == "failed" else str(outcome))
    out.print(table)
    paths = summary.result_files(out_dir)
    if paths:
        header, rows = summary.side_by_side(_runs(paths))
        _print_table(header, rows)
    failed = [n for n, o in outcomes.items() if o.state == "failed"]
    if failed:
        raise CromeError(f"{len(failed)} of {len(outcomes)} cells failed (first: {failed[0]}: "
                         f"{outcomes[failed[0]].message}); rerun to retry them")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_path", required=True, help="The HTML file to write.")
def report(run_dir, out_path):
    """One self-contained HTML page (tables, embedded plots, settings) from an analysis or sweep folder."""
    from .analysis.html_report import build_report

    build_report(run_dir, out_path)
    out.print(f"report written to {out_path}")


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@main.command()
@_common
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but localhost lets other machines edit this model.")
@click.option("--port", type=int, default=7860, show_default=True)
@click.option("--export-dir", default="crome-exports", show_default=True,
              help="Where the page writes delta files and saved models (the page itself names no path).")
@click.option("--gen-tokens", type=int, default=20, show_default=True, help="Tokens of the before/after generations.")
@click.option("--guard-threshold", type=float, default=VERIFY_THRESHOLD, show_default=True,
              help="Largest probe perplexity ratio the verify guard accepts.")
def serve(host, port, export_dir, gen_tokens, **o):
    """Edit the model in the browser: edit, ask, undo any edit, export (needs crome[ui])."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CromeError("crome serve needs the ui extra: pip install 'crome[ui]'") from None
    from .scoring.texts import load_texts, perplexity_source
    from .serving.app import serve as launch
    from .serving.session import EditSession

    if host not in LOCAL_HOSTS:
        err.print(f"[yellow]warning:[/] binding {host}: anyone who can reach this machine can edit the model "
                  f"and read its answers", highlight=False)
    _writable_folder(export_dir, "--export-dir")
    job = _job(o, method=DEFAULT_METHOD, guard="verify", gen_tokens=gen_tokens)
    texts = load_texts(perplexity_source(job.ppl_data))
    lm = _load(job.model, job.load_options)
    with err.status("key statistics, templates and the perplexity monitor"):
        session = EditSession(lm, job, texts, gen_tokens=gen_tokens)
    err.print(f"crome serve: {lm.name} on http://{host}:{port}", highlight=False)
    launch(session, host, port, export_dir)


@main.command("apply")
@click.argument("delta", type=click.Path(dir_okay=False))
@click.option("--save", "save_dir", required=True, help="The folder for the edited model (Hugging Face format).")
@click.option("--model", default=None, help="The base model the delta file was made on (default: the embedded one).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto",
              show_default=True)
def apply_cmd(delta, save_dir, model, dtype):
    """Re-apply a delta file (from crome serve's Export) to its base model and save the result."""
    from .editing.delta import apply_edits, read_delta
    from .editing.memory import MEMORY_FILE, memory_from_delta
    from .models import LoadOptions, save_model

    _writable_folder(save_dir, "--save")
    meta, edits = read_delta(delta)         # a bad file fails before the model loads
    memory = memory_from_delta(meta, edits)
    lm = _load(model, LoadOptions(dtype))
    apply_edits(lm, meta, edits, delta)
    save_model(lm, save_dir)
    facts = sum(len(e.requests) for e in edits)
    out.print(f"applied {len(edits)} edits ({facts} facts) from {delta} to {lm.name}; saved to {save_dir}")
    if memory is not None:
        memory.save(Path(save_dir) / MEMORY_FILE)
        out.print(f"{len(memory)} of them live in the gated memory: {MEMORY_FILE} beside the weights, which crome "
                  f"puts back on when it loads the folder (plain transformers loads the weights without them)")


if __name__ == "__main__":
    main()
