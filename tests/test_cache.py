"""Caches under concurrency and kills (issue 25): one computation for many processes, atomic
entries, damaged entries detected and recomputed, an unwritable folder, and the real key
statistics computed by 4 processes at once on an empty cache."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import signal
import time
import types
from pathlib import Path

import pytest

from crome.cache import cached, decode, encode

CTX = mp.get_context("spawn")     # fresh interpreters, as separate `crome` commands would be


def _slow_entry(path: str, log: str, delay: float) -> str:
    """Compute the entry at ``path`` slowly, noting each computation in ``log``."""
    def compute():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(delay)
        return {"value": list(range(1000)), "by": "whoever"}

    value = cached(Path(path), compute, lambda v: json.dumps(v).encode(), json.loads, "test entry")
    return json.dumps(value)


def _run(args):
    return _slow_entry(*args)


def test_four_processes_on_an_empty_cache_compute_once(tmp_path):
    path, log = tmp_path / "c" / "entry.json", tmp_path / "log"
    with CTX.Pool(4) as pool:
        values = pool.map(_run, [(str(path), str(log), 1.0)] * 4)
    assert len(set(values)) == 1
    assert len(log.read_text().split()) == 1                     # one computation
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.json", "entry.json.lock"]   # no temporary left
    assert decode(path.read_bytes()) is not None


def test_kill_during_a_computation_or_write_then_run_again(tmp_path):
    path, log = tmp_path / "c" / "entry.json", tmp_path / "log"
    rng = random.Random(0)
    for _ in range(5):
        p = CTX.Process(target=_slow_entry, args=(str(path), str(log), rng.uniform(0.0, 0.3)))
        p.start()
        time.sleep(rng.uniform(0.0, 2.0))    # start-up, inside the computation, or after the write
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert not path.exists() or decode(path.read_bytes()) is not None    # never a torn entry
    value = json.loads(_slow_entry(str(path), str(log), 0.0))
    assert value["value"] == list(range(1000)) and decode(path.read_bytes()) is not None


@pytest.mark.parametrize("damage", ["truncate", "flip", "old format", "empty"])
def test_a_damaged_entry_is_recomputed_with_one_warning(tmp_path, capsys, damage):
    path = tmp_path / "entry.json"
    calls = []

    def compute():
        calls.append(1)
        return [1, 2, 3]

    def get():
        return cached(path, compute, lambda v: json.dumps(v).encode(), json.loads, "test entry")

    assert get() == [1, 2, 3] and len(calls) == 1
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[:-3], "flip": raw[:-2] + b"9]", "old format": b"[1, 2, 3]", "empty": b""}[damage])
    assert get() == [1, 2, 3] and len(calls) == 2
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "damaged" in err and "\n" == err[-1]
    assert get() == [1, 2, 3] and len(calls) == 2 and decode(path.read_bytes()) == b"[1, 2, 3]"


def test_an_unwritable_cache_folder_computes_without_keeping(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    value = cached(blocker / "sub" / "entry.json", lambda: [7], lambda v: json.dumps(v).encode(), json.loads, "x")
    assert value == [7] and "cannot write the cache folder" in capsys.readouterr().err


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_cache_folder_computes_without_keeping(tmp_path, capsys, monkeypatch, code):
    """The folder exists but refuses new files (a read-only mount, or no permission; injected,
    since the tests run as root, whom chmod does not stop): one warning line, the value used,
    nothing written; an entry already there is still read."""
    import crome.cache

    def refusing_open(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    folder = tmp_path / "cache"
    folder.mkdir()
    cached(folder / "old.json", lambda: [1], lambda v: json.dumps(v).encode(), json.loads, "x")
    monkeypatch.setattr(crome.cache, "os", types.SimpleNamespace(**{**vars(os), "open": refusing_open}))
    value = cached(folder / "entry.json", lambda: [7], lambda v: json.dumps(v).encode(), json.loads, "x")
    err = capsys.readouterr().err
    assert value == [7] and err.count("warning:") == 1 and os.strerror(code) in err
    assert sorted(p.name for p in folder.iterdir()) == ["old.json", "old.json.lock"]
    monkeypatch.undo()
    assert cached(folder / "old.json", lambda: [2], lambda v: json.dumps(v).encode(), json.loads, "x") == [1]


def test_encode_decode():
    assert decode(encode(b"abc")) == b"abc"
    assert decode(encode(b"abc")[:-1]) is None and decode(b"") is None


def _stats_in_process(cache: str, folder: str) -> str:
    os.environ["CROME_CACHE_DIR"] = cache
    import torch

    torch.set_num_threads(1)
    from crome.editing.mom2 import key_stats
    from crome.models import load_model

    return key_stats(load_model(folder, progress=False), 1, samples=200, progress=False).hash


def test_four_processes_compute_the_key_statistics_once(tmp_path, tokenizer):
    from conftest import save_tiny

    folder = save_tiny(tmp_path / "tiny", tokenizer)
    cache = tmp_path / "cache"
    with CTX.Pool(4) as pool:
        hashes = pool.starmap(_stats_in_process, [(str(cache), str(folder))] * 4)
    assert len(set(hashes)) == 1
    assert len(list((cache / "mom2").glob("*.pt"))) == 1 and len(list((cache / "mom2").glob("sampled-*.json"))) == 1
    assert not list((cache / "mom2").glob(".*.tmp"))


@pytest.mark.integration
def test_the_default_model_and_its_gguf_file_by_path_share_the_cache(default_lm):
    """Keyed by content: `--model PATH` to the embedded GGUF file finds the default model's converted
    folder and its key statistics, instead of converting and computing them again."""
    from crome.editing.mom2 import key_stats
    from crome.models import cache_dir, default_gguf_path, load_model

    first = key_stats(default_lm, 2, samples=300, progress=False)
    entries = sorted(p.name for p in (cache_dir() / "mom2").iterdir())
    by_path = load_model(str(default_gguf_path()), progress=False)
    assert by_path.name != default_lm.name and by_path.identity == default_lm.identity
    assert key_stats(by_path, 2, samples=300, progress=False).hash == first.hash
    assert sorted(p.name for p in (cache_dir() / "mom2").iterdir()) == entries
