"""Export base models with adapters to ONNX, and run the exported graphs in ONNX Runtime."""
