from __future__ import annotations

import time

import click

from griffin_export.settings import KV_DTYPE, KV_DTYPES, LAYOUTS, QUANT_SCHEMES

from .options import (
    DTYPES,
    human_bytes,
    int4_changed,
    int4_options,
    int4_settings,
    k_summary,
    model_options,
    require_extra,
    set_summary,
    status,
)


@click.command("onnx")
@click.argument("bundle", required=False, metavar="[BUNDLE|ROUTER]")
@click.option("-o", "--output", required=True, metavar="DIR", help="directory to write (model.onnx, model.onnx.data, tokenizer)")
@click.option("--full", is_flag=True, help="export the unpruned model instead of a bundle's experts (same inputs/outputs)")
@model_options
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="--full only: weights dtype [default: float32]; a bundle's graph has the bundle's dtype")
@click.option("--graph", type=click.Choice(LAYOUTS), default="auto", show_default=True,
              help="lean: fused ops and one KV buffer per layer (the Llama family: Llama, Mistral, Qwen2, Qwen3); "
                   "traced: torch.export of the HF model (every architecture); auto: lean where it covers the model")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="lean graph: KV buffer positions, prompt + generated tokens [default: min(context, 4096)]")
@click.option("--kv-dtype", type=click.Choice(KV_DTYPES), default=None,
              help=f"lean graph: the KV cache's type (float16: half the bytes; int8: a quarter, a scale per KV head and "
                   f"channel measured on a calibration text) [default: {KV_DTYPE}]")
@click.option("--quantize", type=click.Choice(QUANT_SCHEMES), default=None,
              help="block-wise 4-bit MatMul weights (ONNX Runtime's MatMulNBits quantizer); embedding and norms stay float")
@int4_options("--quantize")
@click.option("--force", is_flag=True, help="replace an existing output directory")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary line")
def command(bundle, output, full, model, gguf_file, device, dtype, graph, max_length, kv_dtype, quantize, algorithm,
            block_size, accuracy_level, float_lm_head, force, quiet):
    """Export BUNDLE's pruned decoder (or with --full the whole model) as an ONNX graph.

    One graph serves prefill and decode. The lean graph (the default for the Llama family)
    takes input_ids, attention_mask and past_key_values.{i}.key/.value buffers of
    --max-length positions that it updates in place (ONNX Runtime's GroupQueryAttention);
    the directory also holds genai_config.json, so onnxruntime-genai loads it as it is.
    The traced graph has HF Optimum's inputs and outputs with a cache that grows. The FF
    weights are named initializers: any bundle of the same base model and k per layer runs
    on the graph (griffin-export generate --runtime onnx) without re-export.

    \b
    Examples:
      griffin-export onnx expert.safetensors -o expert_onnx/
      griffin-export onnx expert.safetensors -o expert_onnx/ --max-length 2048
      griffin-export onnx --full -o full_onnx/
      griffin-export onnx expert.safetensors -o traced_onnx/ --graph traced
      griffin-export onnx expert.safetensors -o expert_int4/ --quantize int4
      griffin-export onnx expert.safetensors -o expert_int4_kv8/ --quantize int4 --kv-dtype int8
      griffin-export onnx expert.safetensors -o expert_int4q/ --quantize int4 --block-size 16 --float-lm-head
      griffin-export onnx --full -o pruned_ckpt_onnx/ --model ./pruned-checkpoint-dir
      griffin-export generate expert.safetensors --runtime onnx --onnx expert_onnx/
      griffin-export onnx classes/router.safetensors -o deploy_onnx/    # deploy_onnx/{class}/ each

    Given a ROUTER (from `griffin-export discover`), every class's graph is written into one
    folder under the class's name, with the router and its class bundles copied beside them.
    """
    from griffin_export.classes.router import is_router
    from griffin_export.errors import GriffinError
    from griffin_export.files.outputs import check_output_dir
    from griffin_export.targets.class_set import export_class_set
    from griffin_export.targets.onnx.export import DATA_FILE, MODEL_FILE, export_graph

    if full == (bundle is not None):
        raise GriffinError("give a BUNDLE, or --full for the unpruned model (not both)")
    require_extra("onnx")
    settings = None
    if quantize:
        settings = int4_settings(algorithm, block_size, accuracy_level, float_lm_head)
    elif int4_changed(algorithm, block_size, accuracy_level, float_lm_head):
        raise GriffinError("--algorithm, --block-size, --accuracy-level and --float-lm-head go with --quantize int4")
    t0 = time.perf_counter()
    if bundle is not None and is_router(bundle):
        export_class_set(bundle, output, "onnx", force=force, report=lambda line: status(line, quiet), model=model,
                         gguf_file=gguf_file, dtype=dtype, device=device, progress=not quiet, graph=graph,
                         max_length=max_length, quantize=settings)
        click.echo(set_summary(output, "onnx", time.perf_counter() - t0))
        return
    check_output_dir(output, force, MODEL_FILE)  # fail before loading anything
    status(f"exporting {'the full model' if full else bundle} to ONNX ...", quiet)
    path, info = export_graph(output, bundle, model=model, gguf_file=gguf_file, dtype=dtype, device=device,
                              force=force, progress=not quiet, graph=graph, max_length=max_length,
                              quantize=settings, kv_dtype=kv_dtype)
    size = sum((path / f).stat().st_size for f in (MODEL_FILE, DATA_FILE) if (path / f).exists())
    layout = f"lean graph (KV buffer {info.max_length}, {info.kv})" if info.layout == "lean" else "graph"
    if info.quantization:
        layout += f", {info.quantization} ({info.quant_algorithm}, block {info.quant_block_size})"
    click.echo(f"wrote {path}: {info.kind} {info.architecture} {layout}, {k_summary(info.k, info.d_ff)} × "
               f"{info.num_layers} layers, {info.dtype}, {human_bytes(size)}, {time.perf_counter() - t0:.1f} s")
