"""ONNX graphs of a bundle's pruned decoder: the lean graph (fused ONNX Runtime ops), the traced
graph (torch.export), 4-bit MatMuls, and the contract a runtime reads back (graph.py)."""
