from __future__ import annotations

import click

from griffin_export.evaluation.settings import EvalSettings, escape, list_text, rows_text
from griffin_export.registry import METHODS
from griffin_export.settings import defaults

from .options import chunk_option, dtype_option, given, invoked_command, model_options, require_extra, status

EVAL = defaults(EvalSettings)


@click.command("eval")
@click.option("--data", default=None, metavar="FILE.jsonl",
              help="JSONL rows with the prompt and gold text (and optional max_tokens, stop)")
@click.option("--rows", default=rows_text(EVAL["rows"]), show_default=True, help="row range START:STOP of --data (STOP exclusive)")
@click.option("--methods", default=list_text(EVAL["methods"]), show_default=True,
              help=f"comma-separated: full, any selection method ({', '.join(METHODS)}), "
                   "bundle:PATH (fixed experts from a bundle file), pruned-prefill:PATH (those experts for the "
                   "prompt's prefill too, like generate --pruned-prefill), or class experts chosen per prompt and "
                   "prefilled through: routed:ROUTER (the router's class), guarded:ROUTER (its guard falling back to "
                   "the full model), oracle:ROUTER (the class best at the gold text), labeled:DIR (the row's own "
                   "class, --label-field)")
@click.option("--density", default=list_text(EVAL["densities"]), show_default=True, help="comma-separated densities in (0, 1]")
@click.option("-o", "--output", required=True, metavar="DIR", help="report directory (created; holds eval.jsonl)")
@model_options
@dtype_option
@click.option("--seed", default=EVAL["seed"], show_default=True, help="row r uses seed + r for random / sampling methods")
@click.option("--prompt-field", default=EVAL["prompt_field"], show_default=True, help="JSON field holding the prompt")
@click.option("--target-field", default=EVAL["target_field"], show_default=True, help="JSON field holding the gold text")
@click.option("--separator", default=escape(EVAL["separator"]), show_default=True,
              help="text between prompt and gold text for the log-likelihood (backslash escapes work)")
@click.option("--max-tokens", default=EVAL["max_tokens"], show_default=True, help="generation length for rows without max_tokens")
@chunk_option
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch threads [default: torch's choice]")
@click.option("--ll-only", is_flag=True,
              help="only the gold log-likelihood (no generation, ROUGE or agreement): fast, for searching settings")
@click.option("--label-field", default=EVAL["label_field"], show_default=True,
              help="labeled:DIR: the JSON field holding each row's class (DIR holds a bundle per class, LABEL.safetensors)")
@click.option("--warmup", default=EVAL["warmup"], show_default=True, metavar="N",
              help="as export --warmup N for every selection method: the full model's first N greedy tokens join "
                   "the statistic and start each pruned generation (setting keys get +wN)")
@click.option("--force", is_flag=True, help="discard results already in DIR and start over")
@click.option("--report-only", is_flag=True, help="only redraw the report from DIR/eval.jsonl and DIR/bench.json")
@click.option("--merge", multiple=True, metavar="RUN_DIR",
              help="merge the results of these runs (repeat it: row ranges run side by side, or other settings "
                   "on the same rows; with --rows only those rows) into DIR, then report")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def command(data, rows, methods, density, output, model, gguf_file, device, dtype, seed, prompt_field, target_field,
            separator, max_tokens, chunk_size, threads, ll_only, label_field, warmup, force, report_only, merge, quiet):
    """Quality of every method × density against the full model, as a report in DIR.

    Per prompt: one full-model prefill, then for each setting a teacher-forced gold
    log-likelihood and a greedy generation (ROUGE-1/2/L vs the gold text, agreement with
    the full model). Results are appended per prompt to DIR/eval.jsonl: rerunning the
    same command resumes after the last finished prompt. At the end DIR gets results.json,
    results.md and PNG plots; with DIR/bench.json from `griffin-export bench -o DIR` the
    report adds the speed table and plot.

    \b
    Examples:
      griffin-export eval --data bench/data/xsum_dev.jsonl --rows 0:100 \\
          --methods full,topk,magnitude,random --density 0.25,0.5,0.75,0.9 -o report/
      griffin-export bench --runtime torch,onnx --density 0.25,0.5,0.75 -o report/
      griffin-export eval --report-only -o report/          # redraw with bench.json added
      griffin-export eval --data rows.jsonl --rows 200:300 --methods full,topk,bundle:news.safetensors -o r2/
      griffin-export eval --merge half1/ --merge half2/ -o whole/   # two row ranges run side by side
      griffin-export eval --data rows.jsonl --methods full,topk_refit_edges --density 0.5 --warmup 8 -o w8/
      griffin-export eval --data bench/data/mixed_report.jsonl --prompt-field prompt --target-field reference \\
          --methods full,routed:classes/router.safetensors,guarded:classes/router.safetensors -o routed/
    """
    require_extra("eval", () if not ll_only or report_only or merge else ("matplotlib",))
    from griffin_export.evaluation.report import write_report

    # the report names this command. A run rerun resumes, so --force (start over) is left out; a merge
    # rerun needs it to replace its file. --quiet changes no result.
    cmd = invoked_command(leave_out=("quiet",) if merge else ("force", "quiet"))
    if merge:
        from griffin_export.evaluation.results import merge_results
        from griffin_export.evaluation.settings import parse_rows

        merge_rows = parse_rows(rows) if given("rows") else None
        click.echo(f"wrote {merge_results(merge, output, force=force, rows=merge_rows, command=cmd)}")
    if report_only or merge:
        for path in write_report(output):
            click.echo(f"wrote {path}")
        return

    from griffin_export.errors import GriffinError
    from griffin_export.evaluation.runner import evaluate
    from griffin_export.evaluation.settings import parse_densities, parse_list, parse_rows, unescape
    from griffin_export.model.load import ModelSource, use_threads

    if data is None:
        raise GriffinError("--data FILE.jsonl is required (or --report-only to redraw an existing report)")
    settings = EvalSettings(data=data, rows=parse_rows(rows), methods=tuple(parse_list(methods, "methods")),
                            densities=tuple(parse_densities(density)), seed=seed, prompt_field=prompt_field,
                            target_field=target_field, separator=unescape(separator), max_tokens=max_tokens,
                            chunk_size=chunk_size, generate=not ll_only, warmup=warmup, label_field=label_field)
    use_threads(threads)
    path = evaluate(settings, output, ModelSource(model, gguf_file, dtype, device), force=force, progress=not quiet,
                    command=cmd, report=lambda line: status(line, quiet))
    status(f"results in {path}", quiet)
    for p in write_report(output):
        click.echo(f"wrote {p}")
