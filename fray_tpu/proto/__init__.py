"""Generated gRPC code of the worker service (regenerate with `python -m fray_tpu.proto.generate`)."""
