"""A bundle baked into a standalone Hugging Face model directory.

The base model with its FF linears swapped for the bundle's experts (the same swap the
PyTorch runtime makes) is saved with `save_pretrained`, its config's FF width set to k.
`AutoModelForCausalLM.from_pretrained(dir)` then loads it with no griffin code; every
token, the prompt's included, runs through the experts, so it computes what the runtime
computes with `pruned_prefill=True`.

    write_checkpoint("news.safetensors", "news-model/")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..bundle.experts import check_bundle, install
from ..bundle.format import Bundle, BundleInfo, read_bundle
from ..errors import GriffinError
from ..files.outputs import atomic_dir, check_output_dir
from ..model.arch import spec_for
from ..method.budget import ff_width_text
from ..model.load import LoadedModel, load_model

CHECKPOINT_FORMAT = "griffin-checkpoint"
CONFIG_KEY = "griffin"  # config.json field holding the provenance


def uniform_k(info: BundleInfo, source: str, attr: str) -> int:
    if len(set(info.k)) != 1:
        raise GriffinError(
            f"{source}: k differs between layers ({min(info.k)}..{max(info.k)}); a Hugging Face config has one "
            f"{attr} for every layer, so this bundle cannot become a Hugging Face checkpoint; a GGUF "
            "(`griffin-export checkpoint --gguf`) or an ONNX graph (`griffin-export onnx`) takes per-layer widths"
        )
    return info.k[0]


def provenance(info: BundleInfo, source: str) -> dict:
    """What config.json records under `griffin`: where the pruned model came from."""
    return {
        "format": CHECKPOINT_FORMAT,
        "base_model": info.base_model,
        "base_fingerprint": info.base_fingerprint,
        "base_d_ff": info.d_ff,
        "bundle_file": Path(source).name,
        "bundle": info.to_metadata(),
    }


def save_checkpoint(lm: LoadedModel, bundle: Bundle, output: str | os.PathLike, *, force: bool = False,
                    source: str = "bundle") -> Path:
    """Install the bundle's experts into `lm` (consumed: its FF layers are replaced) and save
    it, with its tokenizer, as a plain HF model directory."""
    output = check_output_dir(output, force, "config.json")
    spec = lm.spec
    k = uniform_k(bundle.info, source, spec.d_ff_attr)
    check_bundle(lm, bundle.info, source)
    install(lm, bundle.weights)
    config = lm.model.config
    setattr(config, spec.d_ff_attr, k)  # e.g. intermediate_size (OPT: ffn_dim)
    setattr(config, CONFIG_KEY, provenance(bundle.info, source))
    try:
        with atomic_dir(output) as tmp:
            lm.model.save_pretrained(tmp)
            if lm.tokenizer is not None:
                lm.tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise GriffinError(f"cannot write {output}: {e.strerror or e}") from e
    return output


def write_checkpoint(bundle: str | os.PathLike | Bundle, output: str | os.PathLike, *,
                     model: LoadedModel | str | None = None, gguf_file: str | None = None, device: str = "cpu",
                     force: bool = False, quiet: bool = True) -> Path:
    """Bundle file -> standalone HF model directory. The base model is the one the bundle
    records unless `model` says otherwise (checked by fingerprint, as the runtime does)."""
    source = "bundle" if isinstance(bundle, Bundle) else str(bundle)
    check_output_dir(output, force, "config.json")  # fail before loading anything
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle, load_kv=False)
    uniform_k(bundle.info, source, spec_for(bundle.info.architecture).d_ff_attr)  # before loading the model
    if not isinstance(model, LoadedModel):
        model = load_model(model or bundle.info.base_model, gguf_file=gguf_file, dtype=bundle.info.dtype,
                           device=device, quiet=quiet)
    return save_checkpoint(model, bundle, output, force=force, source=source)


# -- Hugging Face checkpoint directories (checkpoint -o DIR, or any model folder) ---------------

WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _read_config(directory: Path) -> dict:
    f = directory / "config.json"
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GriffinError(f"{f} is not a readable JSON config: {e}") from None
    if not isinstance(config, dict):
        raise GriffinError(f"{f} is not a model config: it holds a JSON {type(config).__name__}, not an object")
    return config


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """A model directory: config.json and the weight files' sizes (no weights read), with the
    provenance block that checkpoint writes into config.json if it came from a bundle."""
    from ..model.arch import ARCHITECTURES

    directory = Path(path)
    config = _read_config(directory)
    arch = config.get("model_type")
    spec = ARCHITECTURES.get(arch)
    ff_attr = spec.d_ff_attr if spec else "intermediate_size"  # OPT calls it ffn_dim
    files = {f.name: f.stat().st_size for f in sorted(directory.iterdir()) if f.suffix in WEIGHT_SUFFIXES}
    griffin = config.get(CONFIG_KEY)
    return {
        "file": str(directory),
        "format": "hf-checkpoint",
        "architecture": arch,
        "dtype": config.get("dtype") or config.get("torch_dtype"),  # transformers 5 / 4 spelling
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "ff_attr": ff_attr,
        "ff_width": config.get(ff_attr),  # one number, or one per layer
        "context_length": config.get(spec.context_attr if spec else "max_position_embeddings"),
        "weights": {"files": files, "bytes": sum(files.values())},
        "tokenizer": [n for n in TOKENIZER_FILES if (directory / n).is_file()],
        "griffin": griffin if isinstance(griffin, dict) else None,
    }


def format_checkpoint(s: dict) -> str:
    g = s["griffin"] or {}
    b = g.get("bundle") or {}
    w = s["weights"]
    files = ", ".join(f"{name} {size:,} bytes" for name, size in w["files"].items()) or "none found"
    pruned = " (pruned by griffin-export)" if g else ""
    lines = [
        f"{s['file']}: Hugging Face checkpoint{pruned}, {w['bytes']:,} bytes of weights",
        (f"  architecture {s['architecture'] or '?'}, {s['dtype'] or '?'}, {s['layers'] or '?'} layers, "
         f"hidden {s['hidden_size'] or '?'}, context {s['context_length'] or '?'}"),
        f"  FF width     {s['ff_attr']} {ff_width_text(s['ff_width'], s['layers'], g.get('base_d_ff'))}",
        f"  weights      {files}",
        f"  tokenizer    {', '.join(s['tokenizer']) or 'none (give one when loading)'}",
    ]
    if g:
        lines += [
            f"  base model   {g.get('base_model', '?')}",
            f"  fingerprint  {g.get('base_fingerprint', '?')}",
            (f"  bundle       {g.get('bundle_file', '?')}: {b.get('kind', 'prompt')} bundle, {b.get('method', '?')}, "
             f"density {b.get('density', '?')}, {b.get('prompt_tokens', '?')} prompt tokens, "
             f"griffin-export {b.get('tool_version') or '?'}"),
        ]
    return "\n".join(lines)


def owns(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def describe(path: str | os.PathLike) -> tuple[dict, str]:
    """(summary, text) of a model directory from config.json and its files' sizes (griffin-export inspect)."""
    s = describe_checkpoint(path)
    return s, format_checkpoint(s)
