from __future__ import annotations

import time

import click

from .options import DTYPES, human_bytes, k_summary, model_options, status


@click.command("onnx")
@click.argument("bundle", required=False, metavar="[BUNDLE]")
@click.option("-o", "--output", required=True, metavar="DIR", help="directory to write (model.onnx, model.onnx.data, tokenizer)")
@click.option("--full", is_flag=True, help="export the unpruned model instead of a bundle's experts (same inputs/outputs)")
@model_options
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="--full only: weights dtype [default: float32]; a bundle's graph has the bundle's dtype")
@click.option("--force", is_flag=True, help="replace an existing output directory")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary line")
def command(bundle, output, full, model, gguf_file, device, dtype, force, quiet):
    """Export BUNDLE's pruned decoder (or with --full the whole model) as an ONNX graph.

    The graph has HF Optimum's inputs and outputs (input_ids, attention_mask, position_ids,
    past_key_values.{i}.key/.value -> logits, present.{i}.key/.value) with dynamic batch,
    sequence and past length, so one graph serves prefill and decode. The FF weights are
    named initializers: any bundle of the same base model and k per layer runs on this graph
    (griffin-export generate --runtime onnx) without re-export.

    \b
    Examples:
      griffin-export onnx expert.safetensors -o expert_onnx/
      griffin-export onnx --full -o full_onnx/
      griffin-export onnx --full -o pruned_ckpt_onnx/ --model ./pruned-checkpoint-dir
      griffin-export generate expert.safetensors --runtime onnx --onnx expert_onnx/
    """
    from griffin_export.errors import GriffinError
    from griffin_export.onnx_export import DATA_FILE, MODEL_FILE, export_graph
    from griffin_export.outputs import check_output_dir

    if full == (bundle is not None):
        raise GriffinError("give a BUNDLE, or --full for the unpruned model (not both)")
    t0 = time.perf_counter()
    check_output_dir(output, force, MODEL_FILE)  # fail before loading anything
    status(f"exporting {'the full model' if full else bundle} to ONNX (tracing takes a while) ...", quiet)
    path, info = export_graph(output, bundle, model=model, gguf_file=gguf_file, dtype=dtype, device=device,
                              force=force, progress=not quiet)
    size = sum((path / f).stat().st_size for f in (MODEL_FILE, DATA_FILE) if (path / f).exists())
    click.echo(f"wrote {path}: {info.kind} {info.architecture} graph, {k_summary(info.k, info.d_ff)} × "
               f"{info.num_layers} layers, {info.dtype}, {human_bytes(size)}, {time.perf_counter() - t0:.1f} s")
