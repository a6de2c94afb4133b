"""Entry point: `griffin-export PROMPT -o OUT` exports; other first words name subcommands."""

from __future__ import annotations

import difflib
import os
import re
import sys

import click

# OpenMP threads that spin while they wait for work take the other cores from whatever else runs there,
# and their own process slows most: on a 2-core machine with another job, `generate` decoded at 0.52x
# with torch's two threads spinning against passive ones (docs/speed.md#threads). Except in `bench`,
# which times each runtime at its fastest on a quiet machine: passive threads there cost torch's rows
# about half their speed and llama.cpp's (its OpenMP, the same library, meets at a barrier per op)
# about two thirds; it keeps OpenMP's own default (spin a moment, then sleep), not ACTIVE, whose
# threads spin on through the ONNX Runtime rows timed in between (a run with it was twice as slow). One policy per process, read when
# OpenMP loads with torch.
if sys.argv[1:2] != ["bench"]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from griffin_export import __version__  # noqa: E402
from griffin_export.errors import GriffinError


class ExportFirstGroup(click.Group):
    """A group whose default command is `export`, so the main job reads as
    `griffin-export prompt.txt -o expert.safetensors`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:
            # asking with no arguments is asking for help, not a mistake: stdout, exit 0
            click.echo(ctx.get_help())
            ctx.exit(0)
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            self.refuse_mistyped_command(args[0])
            args = ["export", *args]
        return super().parse_args(ctx, args)

    def refuse_mistyped_command(self, word: str) -> None:
        """`genrate x.safetensors` is a typo, not a prompt file: without this, export would
        complain about a missing -o. An existing file or `-` (stdin) stays a prompt, and so does
        anything shaped like a path (a dot or a slash, which no command name has), so a missing
        `bench.txt` is still reported as a missing prompt file."""
        if word.startswith("-") or os.path.exists(word) or any(c in word for c in "./\\"):  # "-": stdin, or an option
            return
        close = difflib.get_close_matches(word, list(self.commands), n=1, cutoff=0.6)
        if close:
            raise click.UsageError(f"no such command {word!r}; did you mean {close[0]!r}?")


@click.group(cls=ExportFirstGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="griffin-export")
def cli() -> None:
    """Export GRIFFIN prompt-specific FF experts of a causal LM, and decode with them.

    \b
    Examples:
      griffin-export samples/prompt.txt -o expert.safetensors      # default model, density 0.5
      griffin-export generate expert.safetensors --max-new-tokens 64
      griffin-export inspect expert.safetensors
      griffin-export bench --density 0.25,0.5,0.75

    `griffin-export PROMPT ...` is short for `griffin-export export PROMPT ...`.
    """


def _register() -> None:
    from . import bench, checkpoint, classes, discover, eval, export, generate, inspect, onnx, serve

    for module in (export, generate, inspect, bench, classes, discover, checkpoint, eval, onnx, serve):
        cli.add_command(module.command)
    cli.add_command(classes.merge_command)


_register()


# Library parameters the command line spells otherwise than as --NAME (the rest map by name)
_ALIASES = {"graph_dir": "--onnx", "full_graph_dir": "--onnx-full", "lean=False": "--eager", "compile": "--compile",
            "drain_s": "--drain-seconds", "bundles": "BUNDLE...", "kv_dtypes": "--kv-dtype"}


def cli_words(message: str, command: click.Command | None = None) -> str:
    """A library error in the command line's words. The library names its parameters as Python
    does (`force=True`, `max_new_tokens`, `engine='ray'`); the same message on the command line says
    `--force`, `--max-new-tokens`, `--engine ray`. A word maps when it is some command's option and
    the library marked it as a parameter: `name=value`, or the name in backquotes (a bare word stays
    a word: a row's max_tokens field is not the --max-tokens option). Only the running `command`'s
    options map (every command's where none is given): `k=0` neurons is not discover's -k."""
    commands = [command] if command is not None else list(cli.commands.values())
    flags = {p.name: max(p.opts, key=len) for c in commands for p in c.params if isinstance(p, click.Option)}

    def swap(m: re.Match) -> str:
        if m.group(3):  # `name`
            return _ALIASES.get(m.group(3)) or flags.get(m.group(3)) or m.group(0)
        name, value = m.group(1), m.group(2)
        whole = f"{name}={value}" if value is not None else name
        if whole in _ALIASES:
            return _ALIASES[whole]
        flag = _ALIASES.get(name) or flags.get(name)
        if flag is None or value is None:
            return m.group(0)
        if value in (None, "True"):
            return flag
        return f"{flag} {value.strip(chr(39))}"

    return re.sub(r"(?<![\w./`-])([a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?:=('[^']*'|[^\s,;:)]+))?|`([a-z_0-9]+)`", swap,
                  message)


def _command_of(argv: list[str]) -> click.Command | None:
    """The command an argument list runs (a first word that is no command is export's prompt)."""
    if not argv or argv[0].startswith("-"):
        return None
    return cli.commands.get(argv[0], cli.commands["export"])


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, job schedulers) raised as an interrupt, so the temp outputs of an
    export are removed as on Ctrl-C instead of being left behind."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        signal.signal(signal.SIGTERM, _terminate)
    try:
        rv = cli.main(args=argv, prog_name="griffin-export", standalone_mode=False)
    except GriffinError as e:
        args = list(argv) if argv is not None else sys.argv[1:]
        click.echo(f"griffin-export: error: {cli_words(str(e), _command_of(args))}", err=True)
        sys.exit(2)
    except click.UsageError as e:
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
        click.echo(f"griffin-export: error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"griffin-export: error: {e.format_message()}", err=True)
        sys.exit(2)
    except (click.Abort, KeyboardInterrupt) as e:
        if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated):  # click wraps it in Abort
            click.echo("griffin-export: terminated", err=True)
            sys.exit(143)
        click.echo("griffin-export: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
