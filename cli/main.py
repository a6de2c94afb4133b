"""Entry point: `griffin-export PROMPT -o OUT` exports; other first words name subcommands."""

from __future__ import annotations

import sys

import click

from griffin_export import __version__
from griffin_export.errors import GriffinError


class ExportFirstGroup(click.Group):
    """A group whose default command is `export`, so the main job reads as
    `griffin-export prompt.txt -o expert.safetensors`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)


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
    from . import bench, checkpoint, classes, eval, export, generate, inspect, onnx

    for module in (export, generate, inspect, bench, classes, checkpoint, eval, onnx):
        cli.add_command(module.command)
    cli.add_command(classes.merge_command)


_register()


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
        click.echo(f"griffin-export: error: {e}", err=True)
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
