"""The agent on every TPU VM (`python -m fray_tpu.worker`) and the attempt runner."""
