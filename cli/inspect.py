from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("path", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def command(path, as_json):
    """Summarize a bundle (.safetensors) from its header alone: no weights are loaded.

    \b
    Examples:
      griffin-export inspect expert.safetensors
      griffin-export inspect expert.safetensors --json | jq .metadata
    """
    from griffin_export.inspect import describe_bundle, format_bundle

    summary = describe_bundle(path)
    click.echo(json.dumps(summary, indent=2) if as_json else format_bundle(summary))
