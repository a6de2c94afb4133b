from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("path", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def command(path, as_json):
    """Summarize a bundle (.safetensors), a class statistic (class --save-statistic, or a shard's
    from class --shard) or an ONNX graph (.onnx, or its directory) from its header alone: no
    weights are loaded.

    For a graph: inputs and outputs with dtypes and symbolic shapes, per-layer FF widths
    found in the initializers, operator histogram, initializer bytes inline vs external,
    opset and metadata.

    \b
    Examples:
      griffin-export inspect expert.safetensors
      griffin-export inspect expert.safetensors --json | jq .metadata
      griffin-export inspect part-3.safetensors                 # a shard's partial statistic
      griffin-export inspect expert_onnx/model.onnx
      griffin-export inspect expert_onnx/ --json | jq .ff_width_per_layer
    """
    from griffin_export.describe import inspect_path

    summary, text = inspect_path(path)
    click.echo(json.dumps(summary, indent=2) if as_json else text)
