"""Runtimes that decode with a bundle: PyTorch here, ONNX Runtime in onnx.py."""
