"""The ``crome`` command: ``crome edit`` and ``crome demo``.

Errors print one line and exit with code 2 (no traceback unless ``--debug``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .edit import METHODS
from .errors import CromeError

out = Console()
err = Console(stderr=True)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(model: str | None):
    from .models import load_model

    _quiet_transformers()
    with err.status(f"loading {model or 'the default model'}"):
        return load_model(model)


def _texts(ppl_data: str | None):
    from .texts import default_corpus_path, load_texts

    path = ppl_data or os.environ.get("CROME_PPL_DATA")
    return load_texts(path), str(path or default_corpus_path())


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
            err.print(f"[red]error:[/] {label}{msg}", highlight=False, soft_wrap=True)
            sys.exit(getattr(exc, "exit_code", 2))


@click.group(cls=_Main)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def main(ctx, debug):
    """crome: ROME and C-ROME fact edits that don't collapse the model."""
    ctx.obj = {"debug": debug}


def _model_opts(f):
    f = click.option("--model", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct).")(f)
    f = click.option("--layer", type=int, default=None, help="Layer to edit (default: the model's table entry).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed for the context templates.")(f)
    return f


def _common(f):
    f = _model_opts(f)
    f = click.option("--ppl-data", default=None, help="Texts for perplexity (ME-PPL JSON or one passage a line); default: the bundled corpus, or $CROME_PPL_DATA.")(f)
    return f


@main.command()
@click.option("--prompt", required=True, help='Prompt with "{}" for the subject, or with the subject written out.')
@click.option("--subject", required=True)
@click.option("--target", "target_new", required=True, help="The new target.")
@click.option("--target-true", default=None, help="The old target (recorded).")
@click.option("--method", type=click.Choice(METHODS), default="crome", show_default=True)
@_common
@click.option("--mom2-corpus", default=None, help="Corpus for second-moment key statistics (turns mom2 adjustment on).")
@click.option("--no-ppl", is_flag=True, help="Skip the perplexity check.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--out", "out_path", default=None, help="Also write the JSON result to this file.")
@click.option("--save", "save_dir", default=None, help="Save the edited model (Hugging Face format) here.")
@click.option("--guard", type=click.Choice(["off", "refuse", "fallback"]), default="off", show_default=True,
              help="Collapse guard: refuse a predicted collapse (exit 3, weights untouched) or make the C-ROME edit instead.")
def edit(prompt, subject, target_new, target_true, method, model, layer, seed, ppl_data, mom2_corpus,
         no_ppl, as_json, out_path, save_dir, guard):
    """Edit one fact and report what it did to the model."""
    from .fast import PerplexityMonitor
    from .hparams import defaults_for
    from .mom2 import second_moment
    from .models import save_model
    from .report import measure_edit
    from .request import EditRequest

    request = EditRequest.create(prompt, subject, target_new, target_true)
    texts, ppl_name = (None, None) if no_ppl else _texts(ppl_data)
    lm = _load(model)
    hp = defaults_for(lm.name, lm.num_layers).with_(layer=layer)
    lm.check_layer(hp.layer)
    mom2 = None
    if mom2_corpus:
        hp = hp.with_(mom2_adjustment=True)
        mom2 = second_moment(lm, hp.layer, mom2_corpus, hp.mom2_samples)
    with err.status(f"{method}: computing the edit at layer {hp.layer} and measuring it"):
        monitor = PerplexityMonitor(lm, texts, hp.layer) if texts else None
        report, computed = measure_edit(lm, request, method, monitor=monitor, ppl_data=ppl_name, seed=seed, guard=guard,
                                        hparams=hp, mom2=mom2, keep=bool(save_dir))
    result = report.to_dict()
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=2))
    if save_dir:
        if not report.applied:
            raise CromeError("non-finite update: nothing to save")
        save_model(lm, save_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        out.print(report_table([result], [method], title=f"{request.text()} → {request.target_new}  ({lm.name}, layer {report.layer})"))
        if save_dir:
            out.print(f"edited model saved to {save_dir}")


DEMO_CASES = [
    ("first-token subject", "{} is the capital of", "Paris", "Germany"),
    ("subject later in the prompt", "The mother tongue of {} is", "Danielle Darrieux", "English"),
]


@main.command()
@_common
@click.option("--tokens", default=20, show_default=True, help="Tokens generated after each edit.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(model, layer, seed, ppl_data, tokens, as_json):
    """ROME vs C-ROME on a first-token subject and a normal one: the collapse and its fix."""
    from .fast import PerplexityMonitor
    from .hparams import defaults_for
    from .measure import generate
    from .report import measure_edit
    from .request import EditRequest

    texts, ppl_name = _texts(ppl_data)
    lm = _load(model)
    layer = defaults_for(lm.name, lm.num_layers).with_(layer=layer).layer
    lm.check_layer(layer)
    with err.status("perplexity of the unedited model"):
        monitor = PerplexityMonitor(lm, texts, layer)
    results = []
    for label, prompt, subject, target in DEMO_CASES:
        request = EditRequest.create(prompt, subject, target)
        reports = []
        unedited = generate(lm, request.text(), tokens)
        for method in METHODS:
            with err.status(f"{label}: {method} edit of {request.text()!r} → {target}"):
                report, _ = measure_edit(lm, request, method, monitor=monitor, ppl_data=ppl_name, generate_tokens=tokens, layer=layer, seed=seed)
            reports.append(report.to_dict())
        results.append({"case": label, "unedited_generation": unedited, "reports": reports})
        if not as_json:
            out.print(report_table(reports, list(METHODS), title=f"{label}: {request.text()} → {target}"))
            out.print(f"  [dim]unedited:[/] {request.text()}[bold]{unedited!r}[/]", highlight=False)
            for r in reports:
                out.print(f"  [dim]{r['method']:>8}:[/] {request.text()}[bold]{r['generation_after']!r}[/]", highlight=False)
            out.print()
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        out.print(f"[dim]model {lm.name}, perplexity on {ppl_name}, seed {seed}; collapsed = perplexity ratio > 2[/]")


@main.command("eval")
@click.option("--data", required=True, help="CounterFact (flat or full schema) or zsRE JSON; a relative name is also looked up under $CROME_DATA.")
@click.option("--method", type=click.Choice(METHODS), default="crome", show_default=True)
@_common
@click.option("--n", "n_cases", type=int, default=None, help="The first N cases.")
@click.option("--cases", "case_ids", default=None, help="Comma-separated case ids instead of --n.")
@click.option("--test-prefix", type=click.Choice(["none", "fixed", "random"]), default="fixed", show_default=True,
              help="Also measure every metric with a context prefix at test time: the first context template, or one drawn per case.")
@click.option("--out", "out_path", required=True, help="Results, one JSON line per case (appended).")
@click.option("--resume", is_flag=True, help="Continue the run already in --out, skipping finished cases.")
@click.option("--skip-invalid", is_flag=True, help="Skip (and count) malformed records instead of stopping.")
@click.option("--sequential", is_flag=True, help="Let edits accumulate in one model.")
@click.option("--monitor-every", type=int, default=1, show_default=True, help="With --sequential: perplexity and retained efficacy every k-th edit.")
@click.option("--gen-tokens", type=int, default=100, show_default=True, help="Tokens sampled per generation prompt for fluency (0: skip).")
@click.option("--markdown", "md_path", default=None, help="Also write the summary table as Markdown.")
@click.option("--guard", type=click.Choice(["off", "refuse", "fallback"]), default="off", show_default=True,
              help="Collapse guard for every edit; its decision is recorded.")
def eval_(data, method, model, layer, seed, ppl_data, n_cases, case_ids, test_prefix, out_path, resume,
          skip_invalid, sequential, monitor_every, gen_tokens, md_path, guard):
    """Edit, measure and restore each case of a dataset; one JSON line per case, then a summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from . import datasets, evaluate, summary
    from .hparams import defaults_for
    from .templates import context_templates

    if monitor_every < 1:
        raise CromeError("--monitor-every must be at least 1")
    if n_cases is not None and n_cases < 1:
        raise CromeError("--n must be at least 1")
    dataset = datasets.load_cases(data, skip_invalid=skip_invalid)
    if dataset.skipped:
        err.print(f"skipped {len(dataset.skipped)} invalid records of {dataset.path} (first: {dataset.skipped[0]})")
    cases = datasets.select(dataset, n_cases, case_ids.split(",") if case_ids else None)
    texts, ppl_name = _texts(ppl_data)
    lm = _load(model)
    hp = defaults_for(lm.name, lm.num_layers).with_(layer=layer)
    lm.check_layer(hp.layer)
    settings = evaluate.Settings(method=method, model=lm.name, layer=hp.layer, seed=seed, test_prefix=test_prefix,
                                 data=Path(dataset.path).name, ppl_data=Path(ppl_name).name, gen_tokens=gen_tokens,
                                 sequential=sequential, monitor_every=monitor_every if sequential else 1, guard=guard)
    with err.status("context templates"):
        templates = context_templates(lm, seed, hp.template_lengths, hp.template_starts)

    def progress(items, total, description):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True) as bar:
            yield from bar.track(items, total=total, description=description)

    records = evaluate.run(lm, cases, settings, hp, templates, texts, out_path, resume=resume, progress=progress)
    header, rows = summary.side_by_side([(summary.label(records, out_path), records)])
    _print_table(header, rows, title=f"{method} on {Path(dataset.path).name}, {lm.name}, layer {hp.layer}")
    rate = summary.cases_per_minute(out_path)
    out.print(f"[dim]results: {out_path}" + (f"; {rate:.1f} cases per minute" if rate else "") + "[/]")
    if md_path:
        Path(md_path).write_text(summary.to_markdown(header, rows))


def _print_table(header, rows, title=None):
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[c.replace("**", "") for c in r], style="bold" if r[0].startswith("**") else None)
    out.print(table)


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--markdown", "md_path", default=None, help="Write the table as Markdown here.")
@click.option("--csv", "csv_path", default=None, help="Write the table as CSV here.")
def summarize(results, md_path, csv_path):
    """Summaries of eval runs, side by side."""
    from . import summary

    header, rows = summary.side_by_side(_runs(results))
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
    from . import summary
    from .evaluate import ResultsFile

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
    from .analyze import update_anatomy

    update_anatomy(_runs(results), Path(out_dir))
    _done(out_dir, "update_anatomy")


@analyze.command("keys")
@click.option("--data", required=True)
@click.option("--n", "n_cases", type=int, default=50, show_default=True)
@click.option("--out-dir", required=True)
@_model_opts
@click.option("--mom2-corpus", default=None, help="Also show C⁻¹k̄ with C from this corpus.")
def analyze_keys(data, n_cases, out_dir, model, layer, seed, mom2_corpus):
    """k^u, k̄, C⁻¹k̄ and prefixed keys per case: PCA and t-SNE, cosine and norm summaries."""
    from . import datasets
    from .analyze import key_geometry
    from .hparams import defaults_for
    from .mom2 import second_moment
    from .templates import context_templates

    cases = datasets.load_cases(data, skip_invalid=True).cases[:n_cases]
    lm = _load(model)
    hp = defaults_for(lm.name, lm.num_layers).with_(layer=layer)
    lm.check_layer(hp.layer)
    mom2 = second_moment(lm, hp.layer, mom2_corpus, hp.mom2_samples) if mom2_corpus else None
    templates = context_templates(lm, seed, hp.template_lengths, hp.template_starts)
    with err.status(f"keys of {len(cases)} cases"):
        key_geometry(lm, cases, hp.layer, templates, Path(out_dir), mom2=mom2, seed=seed)
    _done(out_dir, "key_geometry")


@analyze.command("first-token")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True, help="The dataset the eval run used.")
@click.option("--k", type=int, default=5, show_default=True, help="Cases: the collapsed ones, topped up with the smallest denominators.")
@click.option("--out-dir", required=True)
@_common
def analyze_first_token(results, data, k, out_dir, model, layer, seed, ppl_data):
    """Edit ROME collapse cases again with random text before the subject."""
    from . import datasets
    from .analyze import first_token_experiment
    from .fast import PerplexityMonitor
    from .hparams import defaults_for
    from .templates import context_templates

    (_, records), = _runs([results])
    cases = {c.case_id: c for c in datasets.load_cases(data, skip_invalid=True).cases}
    texts, _ = _texts(ppl_data)
    lm = _load(model)
    hp = defaults_for(lm.name, lm.num_layers).with_(layer=layer if layer is not None else records[0].get("layer"))
    templates = context_templates(lm, seed, hp.template_lengths, hp.template_starts)
    with err.status("ROME edits with the subject first and not first"):
        first_token_experiment(lm, records, cases, hp, templates, PerplexityMonitor(lm, texts, hp.layer),
                               Path(out_dir), k=k, seed=seed)
    _done(out_dir, "first_token")


@analyze.command("prefix")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--out-dir", required=True)
def analyze_prefix(results, out_dir):
    """Efficacy with and without the test-time prefix, by first-token vs other subjects."""
    from .analyze import prefix_effect

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
    from .analyze import guard_analysis

    (_, c), (_, t) = _runs([calib, test])
    guard_analysis(c, t, Path(out_dir))
    _done(out_dir, "guard")


@main.command()
@click.option("--data", required=True, help="Known facts (known_1000.json).")
@click.option("--n", "n_facts", type=int, default=20, show_default=True)
@click.option("--window", type=int, default=10, show_default=True)
@click.option("--out-dir", required=True)
@click.option("--model", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the corrupting noise.")
def trace(data, n_facts, window, out_dir, model, seed):
    """Causal tracing on known facts: where in the model the fact is recalled."""
    from .analyze import causal_trace
    from .datasets import load_knowns

    facts = load_knowns(data)
    lm = _load(model)
    with err.status(f"tracing {n_facts} facts"):
        causal_trace(lm, facts, Path(out_dir), n=n_facts, seed=seed, window=window)
    _done(out_dir, "trace")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_path", required=True, help="The HTML file to write.")
def report(run_dir, out_path):
    """One self-contained HTML page (tables, embedded plots, settings) from an analysis folder."""
    from .html_report import build_report

    build_report(run_dir, out_path)
    out.print(f"report written to {out_path}")


if __name__ == "__main__":
    main()
