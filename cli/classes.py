from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from griffin_export.registry import AGGREGATIONS, CLASS_METHODS
from griffin_export.settings import ClassSettings, CountSettings, defaults, plural

from .options import (
    chunk_option,
    density_option,
    dtype_option,
    human_bytes,
    k_summary,
    model_options,
    offload_from,
    offload_options,
    ray_options,
    recorded_model_options,
    status,
    threads_option,
)

CLASS = defaults(ClassSettings)
COUNT = defaults(CountSettings)

_AGGREGATION_HELP = "how per-prompt scores become one class score: " + "; ".join(
    f"{a.name} = {a.summary}" for a in AGGREGATIONS.values())
_METHOD_HELP = ("neuron selection on the class score; the topk_refit* methods also refit the kept down-projection "
                "columns on all the class's tokens (a D_ff × D_ff Gram per layer: 283 MB on the default model in "
                "float32, twice that while counting in float64)")


@click.command("class")
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("--name", required=True, help="the class's name, recorded in the bundle (e.g. news)")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="class bundle to write (.safetensors); with --shard, the shard's partial statistic")
@click.option("--field", default=COUNT["field"], show_default=True, help="JSONL key holding the prompt text")
@click.option("--limit", default=COUNT["limit"], type=click.IntRange(min=1), help="use only the first N prompts")
@click.option("--aggregation", type=click.Choice(list(AGGREGATIONS)), default=CLASS["aggregation"],
              show_default=True, help=_AGGREGATION_HELP)
@model_options
@offload_options
@dtype_option
@density_option
@click.option("--method", type=click.Choice(CLASS_METHODS), default=CLASS["method"], show_default=True, help=_METHOD_HELP)
@click.option("--save-statistic", "save_statistic", default=None, metavar="FILE",
              help="also write the class's statistic (its sums, and the Gram for a refit --method): "
                   "bundles at other densities and methods, and merges of shards, come from it without a prefill")
@click.option("--statistic", "statistics", multiple=True, metavar="FILE",
              help="build from saved statistics instead of INPUTs (repeat it to merge shards of one class)")
@click.option("--shard", default=None, metavar="I/N",
              help="count only the I-th of N slices of the prompts and write its partial statistic to -o; "
                   "griffin-export class-merge sums the N parts into the bundle")
@click.option("--batch-size", default=COUNT["batch_size"], show_default=True, type=click.IntRange(min=1),
              help="prompts per prefill (right-padded; the statistic is the unbatched one)")
@ray_options("count")
@click.option("--seed", default=CLASS["seed"], show_default=True, help="seed for sample / topk_sample")
@click.option("--chat", is_flag=True, help="wrap each prompt in the model's chat template")
@chunk_option
@threads_option
@click.option("--resume", is_flag=True,
              help="keep the count's progress beside -o (.NAME.partial, every two minutes) and continue from it: "
                   "rerun an interrupted `class ... --resume` as it was, and the prompts it counted are not counted "
                   "again")
@click.option("--force", is_flag=True, help="overwrite an existing output file")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary line")
def command(inputs, name, output, field, limit, aggregation, model, gguf_file, device, device_map, max_memory,
            offload_folder, dtype, density, method, save_statistic, statistics, shard, batch_size, engine, address,
            workers, gpus_per_worker, seed, chat, chunk_size, threads, resume, force, quiet):
    """Experts for a class of prompts: one full prefill per prompt, one bundle for all.

    INPUT is a JSONL file (one prompt per line, in --field), a folder of .txt files (one
    prompt per file) or a text file; give several to combine them. Prompts are streamed:
    memory does not grow with their number. Prompts longer than the model's context are
    skipped and counted, never truncated. The bundle has no KV cache: it is for new prompts
    (griffin-export generate CLASS.safetensors --prompt-file NEW.txt).

    \b
    Examples:
      griffin-export class prompts.jsonl --name news -o news.safetensors
      griffin-export class bench/data/xsum_dev.jsonl --field article --limit 200 --name news -o news.safetensors
      griffin-export class prompts/ --name code -o code.safetensors --density 0.75
      griffin-export class a.jsonl b.jsonl extra.txt --name mixed -o mixed.safetensors --aggregation topk_freq
      griffin-export class news.jsonl --name news --method topk_refit -o news.safetensors --save-statistic news.stat
      griffin-export class --statistic news.stat --name news --method topk_refit_edges --density 0.25 -o news_25.safetensors
      griffin-export class news.jsonl --name news --shard 2/8 -o part-2.safetensors    # then: class-merge part-*
      griffin-export class news.jsonl --name news --engine ray --workers 4 -o news.safetensors
    """
    from griffin_export.bundle.format import write_bundle
    from griffin_export.classes.aggregate import write_statistic
    from griffin_export.classes.build import class_bundle, count_class, merge_statistics
    from griffin_export.classes.counting import Checkpoint
    from griffin_export.files.outputs import check_output_path
    from griffin_export.model.load import ModelSource, use_threads

    t0 = time.perf_counter()
    settings = ClassSettings(name=name, aggregation=aggregation, density=density, method=method, seed=seed,
                             chunk_size=chunk_size, chat=chat)
    count = CountSettings(field=field, limit=limit, shard=shard, batch_size=batch_size, engine=engine, address=address,
                          workers=workers, gpus_per_worker=gpus_per_worker, resume=resume)
    source = ModelSource(model, gguf_file, dtype, device, offload_from(device_map, max_memory, offload_folder))
    _check_combinations(inputs, statistics, save_statistic, shard, engine, resume, source.offload)
    check_output_path(output, force)  # fail before loading anything
    if save_statistic:
        check_output_path(save_statistic, force)
    use_threads(threads)
    report = lambda line: status(line, quiet)  # noqa: E731
    if statistics:
        counted = merge_statistics(statistics, dataclasses.replace(source, model=model), report=report)
    else:
        out = Path(output)
        # with --resume the count keeps its progress beside -o, and a rerun continues from it
        checkpoint = Checkpoint(out.with_name(f".{out.name}.partial")) if resume else None
        counted = count_class(inputs, settings, source, count, checkpoint=checkpoint, progress=not quiet, report=report)
        if shard and counted.rows == 0:
            click.echo(f"griffin-export: warning: shard {shard} of {plural(counted.info.inputs_prompts, 'prompt')} has none of "
                       "them; its partial statistic is empty (it still completes the set for class-merge)", err=True)
        if counted.info.skipped:
            click.echo(f"griffin-export: warning: skipped {counted.info.skipped} of {plural(counted.rows, 'prompt')} longer than "
                       f"the model's context (first: {counted.first_skipped})", err=True)
    info, stat = counted.info, counted.stat
    if shard:
        path = write_statistic(info, stat, output, force=force)
        click.echo(f"wrote {path}: shard {shard} of class {name!r}, {plural(stat.prompts, 'prompt')} ({stat.tokens} "
                   f"tokens, {info.skipped} skipped){' with the Gram' if stat.gram is not None else ''}, "
                   f"{human_bytes(path.stat().st_size)}, {time.perf_counter() - t0:.1f} s")
        return
    bundle = class_bundle(counted.lm, info, stat, settings, source=info.extra.get("source", ""))
    path = write_bundle(bundle, output, force=force)
    if save_statistic:
        stat_path = write_statistic(info, stat, save_statistic, force=force)
        status(f"wrote {stat_path}: the statistic of {plural(stat.prompts, 'prompt')}"
               f"{' with the Gram' if stat.gram is not None else ''}, {human_bytes(stat_path.stat().st_size)}", quiet)
    _summary(path, bundle, stat, info.skipped, aggregation, t0)


def _check_combinations(inputs, statistics, save_statistic, shard, engine, resume, offload) -> None:
    if bool(inputs) == bool(statistics):
        raise click.UsageError("give the prompts (INPUT...) or saved statistics (--statistic), one of the two")
    if statistics and save_statistic:
        raise click.UsageError("--save-statistic writes what INPUTs are counted into; with --statistic there is "
                               "nothing new to save")
    if shard and (statistics or save_statistic):
        raise click.UsageError("--shard counts INPUTs into the partial statistic it writes to -o; "
                               "--statistic and --save-statistic do not go with it")
    if statistics and (engine == "ray" or resume):
        raise click.UsageError("--engine ray and --resume count INPUTs; with --statistic there is nothing to count")
    if engine == "ray" and offload is not None:
        raise click.UsageError("--device-map is for one process; Ray workers load the model whole "
                               "(give them --gpus-per-worker, or count shards with --shard)")


def _summary(path, bundle, stat, skipped, aggregation, t0) -> None:
    info = bundle.info
    click.echo(
        f"wrote {path}: class {info.extra.get('class')!r} from {plural(stat.prompts, 'prompt')} ({stat.tokens} tokens, "
        f"{skipped} skipped), {aggregation}, {k_summary(info.k, info.d_ff)} × {info.num_layers} layers "
        f"({info.method}, density {info.density}), {human_bytes(path.stat().st_size)}, "
        f"{time.perf_counter() - t0:.1f} s"
    )


@click.command("class-merge")
@click.argument("parts", nargs=-1, required=True, metavar="PART...")
@click.option("-o", "--output", required=True, metavar="FILE", help="class bundle to write (.safetensors)")
@click.option("--name", default=None, help="the class's name [default: the one the shards were counted for]")
@click.option("--aggregation", type=click.Choice(list(AGGREGATIONS)), default=None,
              help=_AGGREGATION_HELP + " [default: the shards' own]")
@click.option("--method", type=click.Choice(CLASS_METHODS), default=None, help=_METHOD_HELP + " [default: the shards' own]")
@density_option
@recorded_model_options
@dtype_option
@click.option("--seed", default=CLASS["seed"], show_default=True, help="seed for sample / topk_sample")
@click.option("--force", is_flag=True, help="overwrite an existing output file")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary line")
def merge_command(parts, output, name, aggregation, method, density, model, gguf_file, device, dtype, seed, force,
                  quiet):
    """Sum the partial statistics of `class --shard I/N` (every shard once) and write the class bundle.

    The merge adds sums in float64 (equal to one process's to ~1e-12, in any order), so the
    bundle is the one a single `class` run over all the prompts gives. The partial files hold no density (except topk_freq's
    count), so one set of shards gives bundles at any --density.

    \b
    Examples:
      griffin-export class-merge part-*.safetensors --density 0.5 -o news.safetensors
      griffin-export class-merge part-1.st part-2.st part-3.st --method topk_refit_edges -o news.safetensors  # refit parts
    """
    from griffin_export.bundle.format import write_bundle
    from griffin_export.classes.build import class_bundle, merge_statistics
    from griffin_export.files.outputs import check_output_path
    from griffin_export.model.load import ModelSource

    t0 = time.perf_counter()
    check_output_path(output, force)
    counted = merge_statistics(parts, ModelSource(model, gguf_file, dtype, device), shards=True,
                               report=lambda line: status(line, quiet))
    stat_info, stat = counted.info, counted.stat
    settings = ClassSettings(name=name or stat_info.name or "class", aggregation=aggregation or stat_info.aggregation
                             or CLASS["aggregation"], density=density, method=method or stat_info.method or CLASS["method"],
                             seed=seed, chat=stat_info.chat)
    bundle = class_bundle(counted.lm, stat_info, stat, settings, source=stat_info.extra.get("source", ""))
    path = write_bundle(bundle, output, force=force)
    _summary(path, bundle, stat, stat_info.skipped, settings.aggregation, t0)
