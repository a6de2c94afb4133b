from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("path", metavar="FILE|DIR")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def command(path, as_json):
    """Summarize a bundle (.safetensors), a class statistic (class --save-statistic, or a shard's
    from class --shard), an ONNX graph (.onnx, or its directory), a GGUF file (checkpoint
    --gguf, or any GGUF model) or a Hugging Face checkpoint directory (checkpoint -o DIR, or
    any folder with a config.json) from its header alone: no weights are loaded.

    For a graph: inputs and outputs with dtypes and symbolic shapes, per-layer FF widths
    found in the initializers, operator histogram, initializer bytes inline vs external,
    opset and metadata.

    For a GGUF file: architecture, file type, tensor count and bytes, FF width (per layer
    where it differs) and context length; for a pruned one also the base model, its
    fingerprint and the selection, from the griffin.* keys.

    For a checkpoint directory: architecture, dtype, layers, FF width, weight files and
    their bytes; for a pruned one also the base model, its fingerprint and the bundle it
    came from, from config.json's "griffin" block.

    \b
    Examples:
      griffin-export inspect expert.safetensors
      griffin-export inspect expert.safetensors --json | jq .metadata
      griffin-export inspect part-3.safetensors                 # a shard's partial statistic
      griffin-export inspect expert_onnx/model.onnx
      griffin-export inspect expert_onnx/ --json | jq .ff_width_per_layer
      griffin-export inspect pruned.gguf --json | jq .griffin
      griffin-export inspect news-model/                        # checkpoint -o news-model/
    """
    from griffin_export.describe import inspect_path

    summary, text = inspect_path(path)
    click.echo(json.dumps(summary, indent=2) if as_json else text)
