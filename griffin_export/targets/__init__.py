"""Standalone outputs of a bundle: a Hugging Face checkpoint, a GGUF for llama.cpp, and ONNX graphs
(onnx/: the lean and traced graphs, 4-bit quantization, the graph contract); every class of a router
at once (class_set.py)."""
