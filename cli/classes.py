from __future__ import annotations

import time
from pathlib import Path

import click

from .options import chunk_option, density_option, dtype_option, human_bytes, k_summary, model_options, precheck, status

from griffin_export.choices import AGGREGATION_SUMMARIES, CLASS_METHODS, DEFAULT_AGGREGATION


@click.command("class")
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("--name", required=True, help="the class's name, recorded in the bundle (e.g. news)")
@click.option("-o", "--output", required=True, metavar="FILE", help="class bundle to write (.safetensors)")
@click.option("--field", default="prompt", show_default=True, help="JSONL key holding the prompt text")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="use only the first N prompts")
@click.option("--aggregation", type=click.Choice(list(AGGREGATION_SUMMARIES)), default=DEFAULT_AGGREGATION,
              show_default=True,
              help="how per-prompt scores become one class score: pooled = the statistic over all the class's "
                   "tokens at once; mean = mean of each prompt's scores normalized per layer; topk_freq = how "
                   "often a neuron is in a prompt's top-k")
@model_options
@dtype_option
@density_option
@click.option("--method", type=click.Choice(CLASS_METHODS), default="topk", show_default=True,
              help="neuron selection on the class score; the topk_refit* methods also refit the kept "
                   "down-projection columns on all the class's tokens (a D_ff × D_ff Gram per layer: "
                   "283 MB on the default model, float64 while counting)")
@click.option("--save-statistic", "save_statistic", default=None, metavar="FILE",
              help="also write the class's statistic (its sums, and the Gram for a refit --method): "
                   "bundles at other densities and methods, and merges of shards, come from it without a prefill")
@click.option("--statistic", "statistics", multiple=True, metavar="FILE",
              help="build from saved statistics instead of INPUTs (repeat it to merge shards of one class)")
@click.option("--seed", default=0, show_default=True, help="seed for sample / topk_sample")
@click.option("--chat", is_flag=True, help="wrap each prompt in the model's chat template")
@chunk_option
@click.option("--force", is_flag=True, help="overwrite an existing output file")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary line")
def command(inputs, name, output, field, limit, aggregation, model, gguf_file, device, dtype, density, method,
            save_statistic, statistics, seed, chat, chunk_size, force, quiet):
    """Experts for a class of prompts: one full prefill per prompt, one bundle for all.

    INPUT is a JSONL file (one prompt per line, in --field), a folder of .txt files (one
    prompt per file) or a text file; give several to combine them. Prompts are streamed:
    memory does not grow with their number. Prompts longer than the model's context are
    skipped and counted, never truncated. The bundle has no KV cache: it is for new prompts
    (griffin-export generate CLASS.safetensors --prompt-file NEW.txt).

    \b
    Examples:
      griffin-export class prompts.jsonl --name news -o news.safetensors
      griffin-export class ../shared/data/xsum_dev.jsonl --field article --limit 200 --name news -o news.safetensors
      griffin-export class prompts/ --name code -o code.safetensors --density 0.75
      griffin-export class a.jsonl b.jsonl extra.txt --name mixed -o mixed.safetensors --aggregation topk_freq
      griffin-export class news.jsonl --name news --method topk_refit -o news.safetensors --save-statistic news.stat
      griffin-export class --statistic news.stat --name news --method topk_refit_edges --density 0.25 -o news_25.safetensors
      griffin-export class --statistic shard1.stat --statistic shard2.stat --name news -o news.safetensors
    """
    from griffin_export.aggregate import merge, read_statistic, write_statistic
    from griffin_export.bundle import check_output_path, write_bundle
    from griffin_export.classes import ClassSettings, class_bundle, count_prompts, export_class, iter_prompts
    from griffin_export.models import load_model

    t0 = time.perf_counter()
    settings = ClassSettings(name=name, aggregation=aggregation, density=density, method=method, seed=seed,
                             chunk_size=chunk_size, chat=chat)
    if bool(inputs) == bool(statistics):
        raise click.UsageError("give the prompts (INPUT...) or saved statistics (--statistic), one of the two")
    if statistics and save_statistic:
        raise click.UsageError("--save-statistic writes what INPUTs are counted into; with --statistic there is "
                               "nothing new to save")
    check_output_path(output, force)  # fail before loading anything
    if save_statistic:
        check_output_path(save_statistic, force)
    if statistics:
        stat_info, stat = merge(read_statistic(s) for s in statistics)  # bad or mismatched files fail here
        total = stat_info.prompts
        precheck(model or stat_info.base_model, gguf_file, device, [density])
        status(f"{len(statistics)} statistic(s) of {total} prompts; loading model {model or stat_info.base_model} ...",
               quiet)
    else:
        total = count_prompts(inputs, field, limit)  # reads every input once: bad lines fail here, not after an hour
        precheck(model, gguf_file, device, [density])
        status(f"{total} prompts; loading model {model or 'default (SmolLM2-135M-Instruct)'} ...", quiet)
    lm = load_model(model or (stat_info.base_model if statistics else None), gguf_file=gguf_file, dtype=dtype,
                    device=device, quiet=quiet)
    if statistics:
        bundle = class_bundle(lm, stat_info, stat, settings, source=stat_info.extra.get("source", ""))
        skipped, first_skipped = stat_info.skipped, None
    else:
        result = export_class(lm, iter_prompts(inputs, field, limit), settings, total=total, progress=not quiet,
                              source=", ".join(Path(i).name for i in inputs))
        bundle, stat, stat_info = result.bundle, result.statistic, result.info
        skipped, first_skipped = result.skipped, result.first_skipped
        if skipped:
            click.echo(f"griffin-export: warning: skipped {skipped} of {total} prompts longer than the model's "
                       f"context (first: {first_skipped})", err=True)
    path = write_bundle(bundle, output, force=force)
    if save_statistic:
        stat_path = write_statistic(stat_info, stat, save_statistic, force=force)
        status(f"wrote {stat_path}: the statistic of {stat.prompts} prompts"
               f"{' with the Gram' if stat.gram is not None else ''}, {human_bytes(stat_path.stat().st_size)}", quiet)
    info = bundle.info
    click.echo(
        f"wrote {path}: class {name!r} from {stat.prompts} prompts ({stat.tokens} tokens, "
        f"{skipped} skipped), {aggregation}, {k_summary(info.k, info.d_ff)} × {info.num_layers} layers "
        f"({info.method}, density {info.density}), {human_bytes(path.stat().st_size)}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
