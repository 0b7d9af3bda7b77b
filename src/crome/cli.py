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
            sys.exit(2)


@click.group(cls=_Main)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def main(ctx, debug):
    """crome: ROME and C-ROME fact edits that don't collapse the model."""
    ctx.obj = {"debug": debug}


def _common(f):
    f = click.option("--model", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct).")(f)
    f = click.option("--layer", type=int, default=None, help="Layer to edit (default: the model's table entry).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed for the context templates.")(f)
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
def edit(prompt, subject, target_new, target_true, method, model, layer, seed, ppl_data, mom2_corpus,
         no_ppl, as_json, out_path, save_dir):
    """Edit one fact and report what it did to the model."""
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
        report, computed = measure_edit(lm, request, method, texts=texts, ppl_data=ppl_name, seed=seed,
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
    from .measure import generate, perplexity
    from .report import measure_edit
    from .request import EditRequest

    texts, ppl_name = _texts(ppl_data)
    lm = _load(model)
    with err.status("perplexity of the unedited model"):
        ppl_before = perplexity(lm, texts)
    results = []
    for label, prompt, subject, target in DEMO_CASES:
        request = EditRequest.create(prompt, subject, target)
        reports = []
        unedited = generate(lm, request.text(), tokens)
        for method in METHODS:
            with err.status(f"{label}: {method} edit of {request.text()!r} → {target}"):
                report, _ = measure_edit(lm, request, method, texts=texts, ppl_before=ppl_before,
                                         ppl_data=ppl_name, generate_tokens=tokens, layer=layer, seed=seed)
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


if __name__ == "__main__":
    main()
