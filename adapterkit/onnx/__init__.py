"""Export base models with adapters to ONNX, and run the exported graphs in ONNX Runtime."""

from adapterkit.errors import AdapterError


def require_onnxruntime():
    """The onnxruntime module, or an AdapterError saying which extra installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise AdapterError("ONNX Runtime is not installed: pip install 'adapterkit[cpu]' (or 'adapterkit[gpu]' for "
                           "CUDA; never both)") from None
    return onnxruntime
