"""Export of trained towers to ONNX and TensorRT bundles (needs the ``export`` extra)."""
