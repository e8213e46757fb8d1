"""Deployment runtimes: ONNX export verified in ONNX Runtime, TensorRT engines where CUDA exists, and the timers
that measure a network or one layer on them (``budget="latency"`` finds them through ``gcp.core.registry``)."""
