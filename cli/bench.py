from __future__ import annotations

import click

from griffin_export.evaluation.settings import list_text
from griffin_export.registry import RUNTIMES
from griffin_export.settings import (DEFAULT_DATA, GGUF_QUANTS, KV_DTYPES, LLAMA_KV_TYPE, LLAMA_KV_TYPES, PROVIDERS,
                                     BenchSettings, defaults)

from .options import dtype_option, int4_options, int4_settings, model_options, require_extra

BENCH = defaults(BenchSettings)


@click.command("bench")
@model_options
@dtype_option
@click.option("--density", default=list_text(BENCH["densities"]), show_default=True, help="comma-separated densities")
@click.option("--method", default=list_text(BENCH["methods"]), show_default=True,
              help="comma-separated selection methods, each benchmarked at every density")
@click.option("--data", default=None, help=f"JSONL file whose `article` field gives the prompt [default: {DEFAULT_DATA} in "
              "this folder or one above it]")
@click.option("--row", default=BENCH["row"], show_default=True, help="row of --data used as the prompt")
@click.option("--new-tokens", default=BENCH["new_tokens"], show_default=True, help="decode steps timed per repeat")
@click.option("--repeats", default=BENCH["repeats"], show_default=True, help="timed repeats (median reported), after one warm-up")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch threads, and ONNX Runtime's [default: torch every core but one, ONNX Runtime its choice]")
@click.option("--runtime", default=list_text(BENCH["runtimes"]), show_default=True,
              help="comma-separated runtimes: " + "; ".join(f"{name} = {summary}" for r in RUNTIMES.values()
                                                           for name, summary in r.variants.items())
                   + "; ONNX rows export a graph per config")
@click.option("--onnx-provider", type=click.Choice(PROVIDERS), default=BENCH["onnx_provider"], show_default=True,
              help="ONNX Runtime provider for the onnx rows (auto: CUDA when a GPU answers)")
@int4_options("-int4 rows")
@click.option("--gguf-quant", type=click.Choice(GGUF_QUANTS), default=BENCH["gguf_quant"], show_default=True,
              help="llama.cpp rows: the GGUF file type of the base and the pruned files")
@click.option("--kv-dtype", default=None, metavar="LIST",
              help=f"comma-separated KV cache types ({', '.join(KV_DTYPES)}) to time the rows that have one at "
                   "(torch-lean: float32, float16; onnx-lean[-int4], genai: all; llama.cpp: F32, F16, Q8_0) "
                   f"[default: each runtime's own; llama.cpp's {LLAMA_KV_TYPES[LLAMA_KV_TYPE]} always]")
@click.option("-o", "--output", default=None, metavar="DIR", help="also write DIR/bench.json and DIR/bench.md")
@click.option("--force", is_flag=True, help="overwrite an existing DIR/bench.json / bench.md")
def command(model, gguf_file, device, dtype, density, method, data, row, new_tokens, repeats, threads, runtime, onnx_provider,
            algorithm, block_size, accuracy_level, float_lm_head, gguf_quant, kv_dtype, output, force):
    """Decode speed of the full model vs bundles, side by side in one process.

    Prints decode tokens/s for the full model and each density, their ratio, the
    bytes-read bound (with and without the KV read), what each row reads per token (its
    weights at their own precision, its KV cache at its type) against the machine's measured
    read bandwidth, export time vs a plain prefill, bundle size and peak memory. Every runtime named in --runtime is timed in the same
    process, interleaved repeat by repeat. `generate` decodes the Llama family through
    the lean paths: time those with --runtime torch-lean,onnx-lean (the default, torch,
    is transformers' forward per step, as `generate --eager`).

    \b
    Examples:
      griffin-export bench
      griffin-export bench --density 0.5 --repeats 9 --threads 2
      griffin-export bench --density 0.5 --method topk,topk_refit_edges
      griffin-export bench --runtime torch,onnx -o bench_out/
      griffin-export bench --runtime torch,torch-lean,onnx,onnx-lean,genai --density 0.5 --repeats 15
      griffin-export bench --runtime torch,onnx --device cuda --dtype float16 --onnx-provider cuda
      griffin-export bench --runtime onnx-lean,onnx-lean-int4,llama.cpp --density 0.5 --threads 2 --repeats 9
      griffin-export bench --runtime torch-lean,onnx-lean-int4,llama.cpp --kv-dtype float32,float16,int8 --density 0.5
    """
    from griffin_export.evaluation.settings import parse_densities, parse_list
    from griffin_export.evaluation.speed import check_results_dir, format_table, run_bench, write_results

    settings = BenchSettings(densities=parse_densities(density), methods=parse_list(method, "methods"), data=data,
                             row=row, new_tokens=new_tokens, repeats=repeats, threads=threads,
                             runtimes=parse_list(runtime, "runtimes"), onnx_provider=onnx_provider,
                             quantize=int4_settings(algorithm, block_size, accuracy_level, float_lm_head), gguf_quant=gguf_quant,
                             kv_dtypes=None if kv_dtype is None else parse_list(kv_dtype, "KV types"))
    if output is not None:  # refuse an existing result before the long run
        check_results_dir(output, force)
    if any(r.startswith("onnx") or r == "genai" for r in settings.runtimes):  # they export graphs
        require_extra("onnx")
    result = run_bench(model, gguf_file=gguf_file, dtype=dtype, device=device, settings=settings)
    click.echo(format_table(result))
    if output is not None:
        json_path, md_path = write_results(result, output, force=force)
        click.echo(f"wrote {json_path} and {md_path}")
