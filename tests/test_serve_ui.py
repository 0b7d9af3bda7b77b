"""``crome serve``'s page (issue 24): two HTTP clients editing at once on a tiny model, and a real
browser (Debian's Chromium driven by Playwright) editing the default model.

The browser test needs /usr/bin/chromium (``apt-get install chromium``; ``.ci/run`` installs it).
Without it the test fails and says so: it never skips silently. CROME_UPDATE_SCREENSHOT=1 also
copies its screenshot to docs/images/serve.png (the README's)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, tiny_model
from test_serve import FACTS, job, replayed, same, weights

from crome.editing.methods import DEFAULT_METHOD
from crome.serving.app import serve
from crome.serving.session import EditSession

CHROMIUM = os.environ.get("CROME_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "serve.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tokenizer, tmp_path):
    session = EditSession(tiny_model("llama", tokenizer), job(), texts=TEXTS, gen_tokens=4)
    port = free_port()
    app = serve(session, port=port, export_dir=tmp_path / "exports", block=False)
    yield session, f"http://127.0.0.1:{port}/", tmp_path
    app.close()


def test_two_http_clients_editing_at_once(served, tokenizer):
    from gradio_client import Client

    session, url, _ = served
    results, errors = [], []

    def client(facts):
        try:
            c = Client(url, verbose=False)
            for fact in facts:
                results.append(c.predict(*fact, "crome", "off", "", api_name="/edit")[0])
        except Exception as e:     # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=([FACTS[i], FACTS[(i + 1) % 3]],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 4 and all(r.startswith("Applied") for r in results), (errors, results)
    history = session.history()
    assert [h["number"] for h in history] == [1, 2, 3, 4]
    assert same(replayed(tokenizer, session.applied), weights(session.lm))
    c = Client(url, verbose=False)
    assert "Error" in c.predict("{} is", "Rome", "", "crome", "off", "", api_name="/edit")[0]   # empty target
    assert len(session.history()) == 4
    message = c.predict(2, api_name="/undo")[0]
    assert "undone" in message and [h["number"] for h in session.history()] == [1, 3, 4]
    path, note = c.predict(api_name="/export_delta")
    assert Path(path).stat().st_size > 0 and "crome apply" in note


@pytest.mark.integration
def test_browser_edits_asks_and_undoes_on_the_default_model(default_lm, me_ppl_50, tmp_path):
    """Chromium loads the page, makes an edit with the default method, sees the diagnostics and both generations,
    asks a question, undoes the edit and sees an empty history; a screenshot is kept."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}: apt-get install chromium "
                    f"(or set CROME_CHROMIUM); .ci/run installs it")
    from playwright.sync_api import expect, sync_playwright

    from crome.evaluation.jobs import EvalJob

    original = weights(default_lm)
    session = EditSession(default_lm, EvalJob(data="serve", out="", gen_tokens=12), texts=me_ppl_50[:20],
                          gen_tokens=12)
    port = free_port()
    app = serve(session, port=port, export_dir=tmp_path / "exports", block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#prompt textarea").fill("The mother tongue of {} is")
            page.locator("#subject textarea").fill("Danielle Darrieux")
            page.locator("#target textarea").fill("English")
            page.locator("#edit-button").click()
            expect(page.locator("#verdict")).to_contain_text("Applied", timeout=300_000)
            expect(page.locator("#diagnostics")).to_contain_text("denominator")
            expect(page.locator("#generations")).to_contain_text("The mother tongue of Danielle Darrieux is")
            generations = session.applied[0].report.get("generation_after")
            assert generations and len(session.history()) == 1
            assert session.applied[0].report["method"] == DEFAULT_METHOD     # the page offers the default first
            expect(page.locator("#numbers")).to_contain_text("through the chat template")   # the four readings
            for table in ("#generations", "#numbers"):            # every column inside the page, none cut off
                box, frame = page.locator(f"{table} table").first.bounding_box(), page.locator(table).bounding_box()
                assert box["x"] + box["width"] <= min(frame["x"] + frame["width"], 1280) + 1, table
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            page.get_by_role("tab", name="Ask").click()
            page.locator("#question textarea").fill("The mother tongue of Danielle Darrieux is")
            page.locator("#ask-button").click()
            expect(page.locator("#edited-answer textarea")).not_to_have_value("", timeout=120_000)
            page.locator("#ask-through").get_by_text("through the chat template").click()
            page.locator("#ask-button").click()
            expect(page.locator("#edited-answer textarea")).not_to_have_value("", timeout=120_000)
            page.get_by_role("tab", name="History").click()
            expect(page.locator("#history")).to_contain_text("Danielle Darrieux")
            page.locator("#undo-number input").fill("1")
            page.locator("#undo-button").click()
            expect(page.locator("#undo-message")).to_contain_text("undone", timeout=120_000)
            expect(page.locator("#history")).not_to_contain_text("Danielle Darrieux")
            browser.close()
    finally:
        app.close()
    assert session.history() == [] and same(original, weights(default_lm))
    assert torch.equal(original[0], default_lm.mlp_out(0).weight)
    if os.environ.get("CROME_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "serve.png", SCREENSHOT)
