"""The commands the other test files do not drive: demo, analyze keys and first-token, trace, on a
tiny model saved as a folder (each turns its flags into an EvalJob and a RunContext; trace into
LoadOptions)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import FLAT, save_tiny, write

from crome.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "tiny", tokenizer)
    write(root, FLAT, "data.json")
    (root / "texts.txt").write_text("The cat sat on the mat.\nRivers run to the sea and the sea is wide.\n")
    write(root, [{"prompt": "Paris is the capital of", "subject": "Paris", "attribute": "France"},
                 {"prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "attribute": "Paris"}],
          "knowns.json")
    return root


def common(files):
    return ["--model", str(files / "tiny"), "--layer", "1", "--no-mom2"]


def test_demo_runs_every_demo_method_on_both_cases(files):
    r = CliRunner().invoke(main, ["demo", *common(files), "--ppl-data", str(files / "texts.txt"), "--tokens", "2",
                                  "--json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout[r.stdout.index("["):])
    assert [c["case"] for c in results] == ["first-token subject", "subject later in the prompt"]
    for case in results:
        assert [x["method"] for x in case["reports"]] == ["rome", "crome", "dual"]
        assert all(x["guard"] == "off" and x["layer"] == 1 and x["ppl_ratio"] > 0 for x in case["reports"])


def test_analyze_keys_and_first_token_and_trace(files, tmp_path):
    r = CliRunner().invoke(main, ["analyze", "keys", "--data", str(files / "data.json"), "--n", "2",
                                  "--out-dir", str(tmp_path / "keys"), *common(files)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "keys" / "key_geometry.json").read_text())["layer"] == 1
    results = tmp_path / "rome.jsonl"
    r = CliRunner().invoke(main, ["eval", "--data", str(files / "data.json"), "--method", "rome", "--out", str(results),
                                  "--ppl-data", str(files / "texts.txt"), "--gen-tokens", "0", *common(files)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["analyze", "first-token", str(results), "--data", str(files / "data.json"),
                                  "--k", "1", "--out-dir", str(tmp_path / "ft"), "--ppl-data", str(files / "texts.txt"),
                                  *common(files)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ft" / "first_token.json").exists()
    # a random model knows no fact: trace loads it (with the loading flags), chooses the layer, then says so
    r = CliRunner().invoke(main, ["trace", "--data", str(files / "knowns.json"), "--n", "2", "--window", "1",
                                  "--out-dir", str(tmp_path / "trace"), *common(files), "--dtype", "float32"])
    assert r.exit_code == 2 and "predicts none of the scanned facts" in r.output, r.output


def test_edit_without_perplexity_does_not_read_the_perplexity_texts(files):
    """--no-ppl skips perplexity: a --ppl-data that does not exist is never read (no error)."""
    r = CliRunner().invoke(main, ["edit", "--prompt", "{} is the capital of", "--subject", "Paris", "--target",
                                  "Germany", *common(files), "--no-ppl", "--ppl-data", "/no/such.json",
                                  "--guard", "off", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["ppl_after"] is None


# ------------------------------------------------------------------ output paths (from test_safety.py)

from crome.errors import CromeError  # noqa: E402  (appended; the imports above are shared)


def test_cli_out_in_a_missing_folder_is_created_before_work(tmp_path, monkeypatch):
    from crome import cli

    loaded = []
    monkeypatch.setattr(cli, "_load", lambda model, options: loaded.append(model) or (_ for _ in ()).throw(CromeError("stop")))
    out = tmp_path / "missing" / "dir" / "x.json"
    res = CliRunner().invoke(cli.main, ["edit", "--prompt", "{} is in", "--subject", "Paris", "--target", "France",
                                        "--out", str(out)])
    assert out.parent.is_dir() and loaded  # the folder exists before the model is even loaded
    (tmp_path / "afolder").mkdir()
    res = CliRunner().invoke(cli.main, ["edit", "--prompt", "{} is in", "--subject", "Paris", "--target", "France",
                                        "--out", str(tmp_path / "afolder")])
    assert res.exit_code == 2 and "output path is a folder" in res.output and len(loaded) == 1


def test_report_names_the_folder_relative_to_where_it_ran(tmp_path, monkeypatch):
    from crome.analysis.html_report import build_report

    run_dir = tmp_path / "work" / "analysis"
    run_dir.mkdir(parents=True)
    (run_dir / "trace.json").write_text(json.dumps({"n_facts": 1}))
    (run_dir / "trace.md").write_text("| a |\n|---|\n| 1 |\n")
    monkeypatch.chdir(tmp_path / "work")
    page = build_report(run_dir, tmp_path / "r.html").read_text()  # an absolute path given
    assert str(tmp_path) not in page and "analysis" in page
