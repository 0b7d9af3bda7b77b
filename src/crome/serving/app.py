"""The page of ``crome serve`` (Gradio, extra ``crome[ui]``): four tabs over one ``EditSession``.

Edit: a fact in, the diagnostics in words, the guard's verdict, perplexity and P(target) before and
after, generations side by side. Ask: the unedited and edited model answer the same prompt,
streamed. History: the applied edits, the perplexity after every edit and undo, Undo. Export: a
delta file to download, or the edited model saved as a Hugging Face folder in ``--export-dir``.

The page names no file: the model, the data and the export folder come from the command line. Every
handler turns a ``CromeError`` into one line on the page; the session keeps the model as it was.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from ..editing.methods import DEFAULT_METHOD, method
from ..errors import CromeError
from ..scoring.readings import readings_rows
from .session import GUARDS, MAX_PROMPT, MAX_TEXT, MAX_TOKENS, METHODS, EditOutcome, EditSession

# the dropdown's labels: the table's, "(list)" after a batch method's (it also takes the list of facts)
METHOD_LABELS = {m: method(m).label + (" (list)" if method(m).batch else "") for m in METHODS}
BATCH_LABELS = " / ".join(method(m).label for m in METHODS if method(m).batch)
PAGE_TITLE = __name__.partition(".")[0]      # the package's name (a string equal to a method's name is the table's)
HISTORY_COLUMNS = ["number", "method", "layers", "facts", "verdict", "ppl_after", "update_ratio"]


def numbers_table(out: EditOutcome) -> list[list[str]]:
    """Perplexity before and after, and the edit read where users look (``scoring.readings``): as typed,
    after a natural sentence, after the test-time prefix and through the chat template."""
    r = out.report or {}

    def f(x):
        return "—" if x is None else f"{x:.4g}"

    rows = [["perplexity", f(out.ppl_before), f(out.ppl_after)]]
    if "p_target_before" in r and not r.get("readings"):
        rows += [["P(target)", f(r["p_target_before"]), f(r.get("p_target_after"))],
                 [f"P(target) after the prefix {r.get('test_prefix')!r}", f(r.get("p_target_before_prefixed")),
                  f(r.get("p_target_after_prefixed"))]]
    rows += readings_rows(r.get("readings") or {})
    for q in r.get("requests", []):
        fact = q["prompt"].replace("{}", q["subject"])
        rows.append([f"P({q['target_new']} | {fact})", f(q["p_target_before"]), f(q["p_target_after"])])
    return rows


def history_rows(session: EditSession) -> list[list]:
    return [[h[c] if not isinstance(h[c], float) else round(h[c], 4) for c in HISTORY_COLUMNS]
            for h in session.history()]


def monitor_plot(session: EditSession):
    """Perplexity after every edit and undo, against the unedited model's (the 'Butterfly' monitor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    base = session.ppl_base
    events = [e for e in session.events if e["ppl"] is not None]
    xs = list(range(len(events) + 1))
    ax.plot(xs, [1.0] + [e["ppl"] / base for e in events] if base else [], "o-")
    ax.set_xticks(xs, ["unedited"] + [e["event"] for e in events], rotation=30, fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(ylabel="perplexity / unedited", title="perplexity after each edit and undo")
    fig.tight_layout()
    plt.close(fig)
    return fig


class Handlers:
    """The page's handlers over one session; each turns a ``CromeError`` into one line on the page."""

    def __init__(self, session: EditSession, export_dir: Path):
        self.session, self.export_dir = session, export_dir

    def history(self):
        return history_rows(self.session), monitor_plot(self.session)

    def edit(self, prompt, subject, target, method, guard, batch):
        try:
            out = self.session.edit(prompt, subject, target, method, guard, batch)
        except CromeError as e:
            return (f"**Error:** {e}", "", [], [], *self.history())
        verdict = ("" if out.applied else "**Not applied.** ") + out.message
        diagnostics = "\n".join(f"- {line}" for line in out.diagnostics) or "_(a MEMIT list: see the numbers)_"
        generations = [[p, b, a] for p, b, a in out.generations]
        return verdict, diagnostics, numbers_table(out), generations, *self.history()

    def ask(self, prompt, tokens, through="typed"):
        try:
            for base, edited in self.session.ask(prompt, tokens, through):
                yield base, edited, ""
        except CromeError as e:
            yield "", "", f"**Error:** {e}"

    def undo(self, number):
        try:
            if number is None:
                raise CromeError("give the number of the edit to undo")
            ppl = self.session.undo(int(number))
            message = f"Edit {int(number)} undone" + (f"; perplexity now {ppl:.4g}." if ppl else ".")
        except CromeError as e:
            message = f"**Error:** {e}"
        return message, *self.history()

    def delta(self):
        try:
            self.export_dir.mkdir(parents=True, exist_ok=True)
            path = self.session.export_delta(self.export_dir / f"edits-{time.strftime('%Y%m%d-%H%M%S')}.crome")
            return path, f"Wrote {path}: apply it with `crome apply {path} --model … --save OUT`."
        except (CromeError, OSError) as e:
            return None, f"**Error:** {e}"

    def model(self):
        try:
            path = self.session.export_model(self.export_dir / f"model-{time.strftime('%Y%m%d-%H%M%S')}")
            return f"Saved the edited model (Hugging Face format) to {path}."
        except (CromeError, OSError) as e:
            return f"**Error:** {e}"


def edit_tab(gr) -> SimpleNamespace:
    """The Edit tab: a fact (or a list of facts), method and guard in; verdict, diagnostics, numbers out."""
    with gr.Tab("Edit"):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt ({} marks the subject)", value="The mother tongue of {} is",
                                max_length=MAX_PROMPT, elem_id="prompt")
            subject = gr.Textbox(label="Subject", value="Danielle Darrieux", max_length=MAX_TEXT, elem_id="subject")
            target = gr.Textbox(label="New target", value="English", max_length=MAX_TEXT, elem_id="target")
        with gr.Row():
            method = gr.Dropdown([(METHOD_LABELS[m], m) for m in METHODS], value=DEFAULT_METHOD, label="Method")
            guard = gr.Dropdown(list(GUARDS), value="verify", label="Guard")
        batch = gr.Textbox(label=f"{BATCH_LABELS}: facts as JSON lines {{prompt, subject, target_new}}",
                           lines=2, elem_id="batch")
        go = gr.Button("Edit", variant="primary", elem_id="edit-button")
        verdict = gr.Markdown(elem_id="verdict")
        diagnostics = gr.Markdown(elem_id="diagnostics")
        numbers = gr.Dataframe(headers=["", "before", "after"], label="Numbers (where users look)", elem_id="numbers",
                               wrap=True, column_widths=["40%", "30%", "30%"])
        generations = gr.Dataframe(headers=["prompt", "before", "after"], label="Greedy generations",
                                   elem_id="generations", wrap=True, column_widths=["30%", "35%", "35%"])
    return SimpleNamespace(prompt=prompt, subject=subject, target=target, method=method, guard=guard, batch=batch,
                           go=go, verdict=verdict, diagnostics=diagnostics, numbers=numbers, generations=generations)


def ask_tab(gr) -> SimpleNamespace:
    """The Ask tab: one prompt, as typed or through the chat template, the unedited and the edited answer
    side by side."""
    with gr.Tab("Ask"):
        question = gr.Textbox(label="Prompt", value="The mother tongue of Danielle Darrieux is",
                              max_length=MAX_PROMPT, elem_id="question")
        with gr.Row():
            tokens = gr.Slider(1, MAX_TOKENS, value=20, step=1, label="Tokens")
            through = gr.Radio([("as typed", "typed"), ("through the chat template", "chat")], value="typed",
                               label="Ask", elem_id="ask-through")
        ask = gr.Button("Ask", variant="primary", elem_id="ask-button")
        with gr.Row():
            base_answer = gr.Textbox(label="Unedited model", elem_id="base-answer")
            edited_answer = gr.Textbox(label="Edited model", elem_id="edited-answer")
        error = gr.Markdown()
    return SimpleNamespace(question=question, tokens=tokens, through=through, ask=ask, base_answer=base_answer,
                           edited_answer=edited_answer, error=error)


def history_tab(gr) -> SimpleNamespace:
    """The History tab: the applied edits, the perplexity monitor, Undo."""
    with gr.Tab("History"):
        history = gr.Dataframe(headers=HISTORY_COLUMNS, label="Applied edits, in order", elem_id="history")
        plot = gr.Plot(label="Perplexity monitor")
        with gr.Row():
            number = gr.Number(label="Edit number", precision=0, elem_id="undo-number")
            undo = gr.Button("Undo", elem_id="undo-button")
        message = gr.Markdown(elem_id="undo-message")
    return SimpleNamespace(history=history, plot=plot, number=number, undo=undo, message=message)


def export_tab(gr) -> SimpleNamespace:
    """The Export tab: a delta file to download, or the edited model saved in the export folder."""
    with gr.Tab("Export"):
        delta = gr.Button("Export the edits as a delta file", elem_id="delta-button")
        delta_file = gr.File(label="Delta file")
        save = gr.Button("Save the edited model (Hugging Face folder)")
        message = gr.Markdown(elem_id="export-message")
    return SimpleNamespace(delta=delta, delta_file=delta_file, save=save, message=message)


def build_app(session: EditSession, export_dir: str | Path = "crome-exports"):
    """The Gradio Blocks of ``crome serve`` (not launched): the four tabs, wired to ``Handlers``."""
    import gradio as gr

    on = Handlers(session, Path(export_dir))
    with gr.Blocks(title=PAGE_TITLE) as app:
        gr.Markdown(f"# crome · {session.lm.name}\nEdit a fact, see what it does to the rest of the model, "
                    f"undo it, keep it.")
        e, a, h, x = edit_tab(gr), ask_tab(gr), history_tab(gr), export_tab(gr)
        e.go.click(on.edit, [e.prompt, e.subject, e.target, e.method, e.guard, e.batch],
                   [e.verdict, e.diagnostics, e.numbers, e.generations, h.history, h.plot], api_name="edit")
        a.ask.click(on.ask, [a.question, a.tokens, a.through], [a.base_answer, a.edited_answer, a.error],
                    api_name="ask")
        h.undo.click(on.undo, [h.number], [h.message, h.history, h.plot], api_name="undo")
        x.delta.click(on.delta, [], [x.delta_file, x.message], api_name="export_delta")
        x.save.click(on.model, [], [x.message], api_name="export_model")
        app.load(on.history, [], [h.history, h.plot], api_name="history")
    return app


def serve(session: EditSession, host: str = "127.0.0.1", port: int = 7860, export_dir="crome-exports",
          block: bool = True):
    """Launch the page; requests that change the weights run one at a time (the queue shows the wait)."""
    app = build_app(session, export_dir).queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False,
               allowed_paths=[str(Path(export_dir).resolve())])
    return app
