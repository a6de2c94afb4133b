"""The command line on tiny saved models: happy path and every bad input of the export issue."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import one_line, run, tiny_prompt


@pytest.fixture
def prompt(tmp_path):
    p = tmp_path / "prompt.txt"
    p.write_text(tiny_prompt(), encoding="utf-8")
    return p


def export(tmp_path, prompt, model_dir, *extra, capsys, name="e.safetensors"):
    return run([prompt, "-o", tmp_path / name, "--model", model_dir, "-q", *extra], capsys)


def test_export_inspect_generate(tmp_path, prompt, tiny_dir, capsys):
    code, out, err = export(tmp_path, prompt, tiny_dir("llama"), "--warmup", "0", capsys=capsys)
    assert code == 0, err
    assert "20 prompt tokens, k=32/64 per layer × 2 layers" in out
    code, out, err = export(tmp_path, prompt, tiny_dir("llama"), capsys=capsys, name="default.safetensors")
    assert code == 0 and "20 prompt tokens + " in out and " warm-up tokens, k=32/64" in out, err  # --warmup 8
    code, out, _ = run(["inspect", tmp_path / "e.safetensors"], capsys)
    assert code == 0 and "k = 32 in every layer (50.0% of FF neurons)" in out
    code, out, err = run(["generate", tmp_path / "e.safetensors", "--max-new-tokens", "5", "-q"], capsys)
    assert code == 0, err
    assert out.strip(), "generated text"


def test_k_summary_names_per_layer_widths():
    from griffin_export_cli.options import k_summary

    assert k_summary([32, 32], 64) == "k=32/64 per layer"
    assert k_summary([64, 20, 12], 64) == "k=12..64/64 per layer (total 96)"


def test_prompt_from_stdin_and_subcommand_name(tmp_path, tiny_dir, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(tiny_prompt().encode())))
    code, out, err = run(["export", "-", "-o", tmp_path / "s.safetensors", "--model", tiny_dir("mistral"), "-q",
                          "--method", "random", "--density", "0.25"], capsys)
    assert code == 0, err
    assert "k=16/64" in out and "(random, density 0.25)" in out


def test_generate_with_a_new_prompt_file(tmp_path, prompt, tiny_dir, capsys):
    export(tmp_path, prompt, tiny_dir("opt"), "--no-kv", capsys=capsys)
    code, out, err = run(["generate", tmp_path / "e.safetensors", "--prompt-file", prompt, "--max-new-tokens", "4",
                          "-q"], capsys)
    assert code == 0, err


def bad(argv, capsys, message, tmp_path=None):
    code, out, err = run(argv, capsys)
    assert code == 2, (code, out, err)
    assert message in err, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("griffin-export: error: "), err
    assert sum("error" in line.lower() for line in lines) == 1, err
    if tmp_path is not None:
        leftovers = [p.name for p in tmp_path.iterdir() if p.suffix in (".safetensors", ".tmp", ".probe")]
        assert leftovers == [], leftovers


def test_missing_prompt(tmp_path, tiny_dir, capsys):
    bad([tmp_path / "nope.txt", "-o", tmp_path / "o.safetensors", "--model", tiny_dir()], capsys,
        "prompt file", tmp_path)


def test_empty_prompt(tmp_path, tiny_dir, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    bad([tmp_path / "empty.txt", "-o", tmp_path / "o.safetensors", "--model", tiny_dir()], capsys, "is empty", tmp_path)


def test_non_utf8_prompt(tmp_path, tiny_dir, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    bad([tmp_path / "latin1.txt", "-o", tmp_path / "o.safetensors", "--model", tiny_dir()], capsys,
        "not valid UTF-8", tmp_path)


def test_prompt_over_the_context(tmp_path, tiny_dir, capsys):
    (tmp_path / "long.txt").write_text(tiny_prompt(300))
    bad([tmp_path / "long.txt", "-o", tmp_path / "o.safetensors", "--model", tiny_dir()], capsys,
        "prompt has 300 tokens; the model's context is 256", tmp_path)


@pytest.mark.parametrize("density, message", [("0", "density must be in (0, 1]"), ("1.5", "density must be in (0, 1]"),
                                              ("0.001", "keeps k=0")])
def test_bad_density(tmp_path, prompt, tiny_dir, capsys, density, message):
    bad([prompt, "-o", tmp_path / "o.safetensors", "--model", tiny_dir(), "--density", density], capsys, message)


def test_unknown_method(tmp_path, prompt, capsys):
    bad([prompt, "-o", tmp_path / "o.safetensors", "--method", "best"], capsys, "Invalid value for '--method'")


def test_unsupported_architecture(tmp_path, prompt, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(d)
    bad([prompt, "-o", tmp_path / "o.safetensors", "--model", d], capsys, "unsupported architecture 'gpt2'")


def test_unsupported_gguf_architecture_is_refused_from_its_header(tmp_path, prompt, capsys):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "mamba.gguf"  # a header naming an architecture the table lacks, one tiny tensor
    w = GGUFWriter(str(path), "mamba")
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    bad([prompt, "-o", tmp_path / "o.safetensors", "--model", path], capsys, "unsupported architecture 'mamba'")
    assert not (tmp_path / "o.safetensors").exists()


def test_model_path_missing(tmp_path, prompt, capsys):
    bad([prompt, "-o", tmp_path / "o.safetensors", "--model", tmp_path / "none"], capsys, "does not exist")


def test_output_directory_missing(tmp_path, prompt, tiny_dir, capsys):
    bad([prompt, "-o", tmp_path / "no" / "o.safetensors", "--model", tiny_dir()], capsys, "does not exist")


def test_output_directory_not_writable(tmp_path, prompt, tiny_dir, capsys):
    bad([prompt, "-o", "/proc/o.safetensors", "--model", tiny_dir()], capsys, "not writable")


def test_existing_output_without_force(tmp_path, prompt, tiny_dir, capsys):
    (tmp_path / "o.safetensors").write_bytes(b"keep me")
    bad([prompt, "-o", tmp_path / "o.safetensors", "--model", tiny_dir()], capsys, "exists; pass --force")
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep me"


def test_generate_with_corrupt_bundle(tmp_path, capsys):
    (tmp_path / "c.safetensors").write_bytes(b"\x00" * 64)
    bad(["generate", tmp_path / "c.safetensors"], capsys, "not a safetensors file")


def test_generate_with_the_wrong_model(tmp_path, prompt, tiny_dir, capsys):
    export(tmp_path, prompt, tiny_dir("llama"), capsys=capsys)
    bad(["generate", tmp_path / "e.safetensors", "--model", tiny_dir("llama", seed=1)], capsys,
        "belongs to base model")


def test_inspect_a_non_bundle(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello")
    bad(["inspect", tmp_path / "x.txt"], capsys, "not a safetensors file")


def test_interrupted_export_leaves_no_file(tmp_path, prompt, tiny_dir, capsys, monkeypatch):
    from griffin_export.method import export as ex

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "prefill", interrupt)
    code, _, err = run([prompt, "-o", tmp_path / "o.safetensors", "--model", tiny_dir(), "-q"], capsys)
    assert code == 130 and "interrupted" in err
    assert not [p for p in tmp_path.iterdir() if p.name != "prompt.txt"]


@pytest.mark.slow
def test_the_installed_command_prints_one_line_errors(tmp_path):
    """The real entry point, in a subprocess: one line, exit 2, no traceback."""
    r = subprocess.run(["griffin-export", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"griffin-export: error: prompt file {tmp_path / 'missing.txt'} does not exist"
    h = subprocess.run(["griffin-export", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "Examples:" in h.stdout and "generate" in h.stdout


def test_the_cli_loads_without_torch():
    """--help and option parsing read the registries and the settings only: no torch, no transformers at load (they
    cost seconds; a command imports them when it runs)."""
    import subprocess
    import sys

    code = "import sys, griffin_export_cli.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves():
    import griffin_export

    # the lazy table once pointed read_prompt at a module that does not define it
    for name in griffin_export.__all__:
        assert getattr(griffin_export, name) is not None, name


def test_cli_defaults_are_the_settings_defaults():
    """Each option's default, as the CLI parses it, is what the library does when the field is left
    out (the CLI takes them from the torch-free settings dataclasses; comma lists, row ranges and
    the separator are shown as text, so this checks that the text reads back to the value)."""
    import dataclasses

    from cli import bench, classes as class_cli, eval as eval_cli, export, generate
    from griffin_export.evaluation.settings import EvalSettings, parse_densities, parse_list, parse_rows, unescape
    from griffin_export.settings import BenchSettings, ClassSettings, DecodeOptions, ExportSettings

    def defaults(command) -> dict:
        return {p.name: p.default for p in command.params}

    def lib(cls, **required) -> dict:
        return {f.name: getattr(cls(**required), f.name) for f in dataclasses.fields(cls)}

    b, B = defaults(bench.command), lib(BenchSettings)
    assert (parse_densities(b["density"]), parse_list(b["method"], "methods"), parse_list(b["runtime"], "runtimes"),
            b["row"], b["new_tokens"], b["repeats"], b["onnx_provider"], b["gguf_quant"], b["block_size"],
            b["accuracy_level"], b["algorithm"]) == \
        (B["densities"], B["methods"], B["runtimes"], B["row"], B["new_tokens"], B["repeats"], B["onnx_provider"],
         B["gguf_quant"], B["quantize"].block_size, B["quantize"].accuracy_level, B["quantize"].algorithm)
    e, E = defaults(eval_cli.command), lib(EvalSettings, data="unused")
    assert (parse_rows(e["rows"]), tuple(parse_list(e["methods"], "methods")), tuple(parse_densities(e["density"])),
            e["seed"], e["prompt_field"], e["target_field"], unescape(e["separator"]), e["max_tokens"],
            e["chunk_size"], e["warmup"]) == (E["rows"], E["methods"], E["densities"], E["seed"], E["prompt_field"],
                                               E["target_field"], E["separator"], E["max_tokens"], E["chunk_size"],
                                               E["warmup"])
    g, D = defaults(generate.command), lib(DecodeOptions)
    assert [g[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")] == \
        [D[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")]
    c, C = defaults(class_cli.command), lib(ClassSettings, name="unused")
    assert [c[k] for k in ("aggregation", "density", "method", "seed", "chunk_size")] == \
        [C[k] for k in ("aggregation", "density", "method", "seed", "chunk_size")]
    x, X = defaults(export.command), lib(ExportSettings)
    # the warm-up too: a script's export_prompt() writes the bundle the command writes (8 tokens)
    assert [x[k] for k in ("density", "method", "seed", "chunk_size", "refit_lambda", "warmup")] == \
        [X[k] for k in ("density", "method", "seed", "chunk_size", "refit_lambda", "warmup")] and X["warmup"] == 8


# -- commands --------------------------------------------------------------------------------------


@pytest.mark.parametrize("typo, command", [("genrate", "generate"), ("inspekt", "inspect"),
                                           ("chekpoint", "checkpoint"), ("Export", "export")])
def test_a_mistyped_command_is_named_not_read_as_a_prompt(tmp_path, capsys, monkeypatch, typo, command):
    monkeypatch.chdir(tmp_path)  # no file of that name here
    err = one_line([typo, "x.safetensors"], capsys)
    assert err == f"griffin-export: error: no such command '{typo}'; did you mean '{command}'?\n"


def test_an_existing_file_named_like_a_command_is_still_a_prompt(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "genrate").write_text(tiny_prompt(), encoding="utf-8")
    one_line(["genrate"], capsys, "Missing option '-o'")  # export's own complaint: it was read as a prompt
    one_line(["-"], capsys, "Missing option '-o'")  # stdin


@pytest.mark.parametrize("word", ["hello", "bench.txt", "prompts/eval"])
def test_a_word_far_from_a_command_or_shaped_like_a_path_is_a_missing_prompt(tmp_path, capsys, monkeypatch, word):
    monkeypatch.chdir(tmp_path)
    one_line([word, "-o", "x.safetensors"], capsys, f"prompt file {word} does not exist")
    assert not (tmp_path / "x.safetensors").exists()


def test_bare_command_prints_the_help_and_succeeds(capsys):
    code, out, err = run([], capsys)
    assert code == 0 and err == ""
    assert out.startswith("Usage: griffin-export") and "Commands:" in out and "inspect" in out


# -- the library's words and the command line's ------------------------------------------------


@pytest.mark.parametrize("library, cli", [
    ("x exists; pass force=True to overwrite", "x exists; pass --force to overwrite"),
    ("`top_p` must be in (0, 1], got 0.0", "--top-p must be in (0, 1], got 0.0"),
    ("lean=False, `compile` are not options of the onnx runtime", "--eager, --compile are not options of the onnx runtime"),
    ("the onnx runtime needs graph_dir=DIR", "the onnx runtime needs --onnx DIR"),
    ("`address`, `workers` and `gpus_per_worker` are for engine='ray'",
     "--address, --workers and --gpus-per-worker are for --engine ray"),
    # plain words stay words: a data row's max_tokens field is not eval's --max-tokens option
    ("d.jsonl:2: max_tokens must be a positive integer", "d.jsonl:2: max_tokens must be a positive integer"),
])
def test_library_errors_name_parameters_and_the_cli_names_its_options(library, cli):
    from griffin_export_cli.main import cli_words

    assert cli_words(library) == cli


def test_only_the_running_commands_options_are_named():
    """k=0 neurons on export is no option; on discover, `k` is its -k/--classes."""
    from griffin_export_cli.main import cli, cli_words

    assert cli_words("density 0.5 keeps k=0 of 64", cli.commands["export"]) == "density 0.5 keeps k=0 of 64"
    assert cli_words("`k` is 5 classes", cli.commands["discover"]) == "--classes is 5 classes"


def test_a_library_error_names_the_parameter(tmp_path):
    from griffin_export import write_bundle
    from griffin_export.settings import DecodeOptions
    from tests.helpers import refused, tiny_model

    from griffin_export import ExportSettings, export_ids
    from tests.helpers import prompt_ids

    path = tmp_path / "e.safetensors"
    bundle = export_ids(tiny_model("llama"), prompt_ids(), ExportSettings(warmup=0))
    write_bundle(bundle, path)
    refused(lambda: write_bundle(bundle, path), "exists; pass force=True to overwrite")
    refused(lambda: DecodeOptions(top_p=0), "`top_p` must be in (0, 1]")


@pytest.mark.parametrize("command", ["export", "generate", "class"])
def test_threads_are_an_option_wherever_torch_runs(command, tmp_path, tiny_dir, capsys):
    import torch

    before = torch.get_num_threads()
    prompt = tmp_path / "p.txt"
    prompt.write_text(tiny_prompt())
    bundle = tmp_path / "b.safetensors"
    assert run([prompt, "-o", bundle, "--model", tiny_dir(), "--warmup", "0", "-q"], capsys)[0] == 0
    argv = {"export": [prompt, "-o", tmp_path / "c.safetensors", "--model", tiny_dir(), "-q"],
            "generate": ["generate", bundle, "--max-new-tokens", "2", "-q"],
            "class": ["class", prompt, "--name", "c", "-o", tmp_path / "k.safetensors", "--model", tiny_dir(), "-q"]}
    try:
        code, _, err = run([*argv[command], "--threads", "1"], capsys)
        assert code == 0 and torch.get_num_threads() == 1, err
    finally:
        torch.set_num_threads(before)
    one_line([*argv[command], "--threads", "0"], capsys, "--threads")
