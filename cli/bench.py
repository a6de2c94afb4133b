from __future__ import annotations

import click

from .options import dtype_option, model_options


@click.command("bench")
@model_options
@dtype_option
@click.option("--density", default="0.25,0.5,0.75", show_default=True, help="comma-separated densities")
@click.option("--data", default=None, help="JSONL file whose `article` field gives the prompt [default: ../shared/data/xsum_dev.jsonl if present, else samples/prompt.txt]")
@click.option("--row", default=0, show_default=True, help="row of --data used as the prompt")
@click.option("--new-tokens", default=64, show_default=True, help="decode steps timed per repeat")
@click.option("--repeats", default=5, show_default=True, help="timed repeats (median reported), after one warm-up")
@click.option("--threads", default=None, type=int, help="torch threads [default: torch's choice]")
def command(model, gguf_file, device, dtype, density, data, row, new_tokens, repeats, threads):
    """Decode speed of the full model vs bundles, side by side in one process.

    Prints decode tokens/s for the full model and each density, their ratio, the
    bytes-read bound, export time vs a plain prefill, bundle size and peak memory.

    \b
    Examples:
      griffin-export bench
      griffin-export bench --density 0.5 --repeats 9 --threads 2
    """
    from griffin_export.bench import BenchSettings, format_table, run_bench

    settings = BenchSettings(densities=[float(d) for d in density.split(",")], data=data, row=row,
                             new_tokens=new_tokens, repeats=repeats, threads=threads)
    result = run_bench(model, gguf_file=gguf_file, dtype=dtype, device=device, settings=settings)
    click.echo(format_table(result))
