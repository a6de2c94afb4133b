"""A bundle baked into a standalone Hugging Face model directory.

The base model with its FF linears swapped for the bundle's experts (the same swap the
PyTorch runtime makes) is saved with `save_pretrained`, its config's FF width set to k.
`AutoModelForCausalLM.from_pretrained(dir)` then loads it with no griffin code; every
token, the prompt's included, runs through the experts, so it computes what the runtime
computes with `pruned_prefill=True`.

    write_checkpoint("news.safetensors", "news-model/")
"""

from __future__ import annotations

import os
from pathlib import Path

from ..bundle.experts import check_bundle, install
from ..bundle.format import Bundle, BundleInfo, read_bundle
from ..errors import GriffinError
from ..files.outputs import atomic_dir, check_output_dir
from ..model.arch import spec_for
from ..model.load import LoadedModel, load_model

CHECKPOINT_FORMAT = "griffin-checkpoint"
CONFIG_KEY = "griffin"  # config.json field holding the provenance


def uniform_k(info: BundleInfo, source: str, attr: str) -> int:
    if len(set(info.k)) != 1:
        raise GriffinError(
            f"{source}: k differs between layers ({min(info.k)}..{max(info.k)}); a Hugging Face config has one "
            f"{attr} for every layer, so this bundle cannot become a standalone checkpoint; `griffin-export onnx` "
            "takes per-layer widths (a GGUF export does not exist yet)"
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
