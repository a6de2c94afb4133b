"""Decoding with a bundle (registry.RUNTIMES): PyTorch (pytorch.py, the lean step in lean.py), ONNX Runtime
(onnx.py), onnxruntime-genai and llama.cpp (benchmark rows); with a router, each prompt's class experts
(routed.py); opening one from options (opening.py); one generate loop and batching (base.py), answers
files (answers.py), and what each gives the speed benchmark (timing.py)."""
