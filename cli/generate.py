from __future__ import annotations

import time

import click

from .options import decode_options, model_options, status


@click.command("generate")
@click.argument("bundle", metavar="BUNDLE")
@model_options
@decode_options
@click.option("--prompt-file", default=None, help="a new prompt: full-model prefill, then decode with the bundle's experts")
@click.option("-q", "--quiet", is_flag=True, help="print only the generated text")
def command(bundle, model, gguf_file, device, max_new_tokens, temperature, top_p, stop, seed, prompt_file, quiet):
    """Decode from BUNDLE with its experts, resuming from the bundle's cached KV.

    The base model is the one recorded in the bundle unless --model says otherwise; it must
    be the exact model the bundle was exported from (checked by fingerprint).

    \b
    Examples:
      griffin-export generate expert.safetensors --max-new-tokens 64
      griffin-export generate expert.safetensors --temperature 0.7 --top-p 0.9 --stop "###"
      griffin-export generate expert.safetensors --prompt-file new_article.txt
    """
    from griffin_export.bundle import read_info
    from griffin_export.decoding import DecodeOptions
    from griffin_export.export import read_prompt
    from griffin_export.runtime.pytorch import load_runtime

    opts = DecodeOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         stop=tuple(stop), seed=seed)
    prompt = read_prompt(prompt_file) if prompt_file else None
    info = read_info(bundle)
    status(f"loading base model {model or info.base_model} ...", quiet)
    rt = load_runtime(bundle, model, gguf_file=gguf_file, device=device, new_prompts=prompt is not None)
    t0 = time.perf_counter()
    out = rt.generate(opts, prompt=prompt)
    dt = time.perf_counter() - t0
    click.echo(out.text)
    status(f"[{len(out.token_ids)} tokens in {dt:.2f} s, {len(out.token_ids) / max(dt, 1e-9):.1f} tok/s, "
           f"stop: {out.stop_reason}]", quiet)
