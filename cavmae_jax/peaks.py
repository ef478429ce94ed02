"""Peak bfloat16 matrix TFLOP/s of one JAX device, by its device kind: the denominator of the
MFU the trainer logs. Published dense figures; a kind not listed (a CPU) has none, and the
config's ``peak_tflops`` (measured, or another chip's) takes precedence."""

from __future__ import annotations

from cavmae_jax.tpu import CHIPS

# (prefix of jax.Device.device_kind, TFLOP/s); the more specific prefix first
PEAKS = (
    ("TPU v4", 275.0),
    ("TPU v5 lite", CHIPS["v5e"].peak_tflops),
    ("TPU v5", CHIPS["v5p"].peak_tflops),
    ("TPU v6 lite", CHIPS["v6e"].peak_tflops),
    ("TPU v6e", CHIPS["v6e"].peak_tflops),
    ("NVIDIA A100", 312.0),
    ("NVIDIA H100", 989.0),
    ("NVIDIA H200", 989.0),
)


def peak_tflops(device_kind: str, configured: float = 0.0) -> float | None:
    """``configured`` when set (> 0), else the table's figure for ``device_kind``, else None."""
    if configured > 0:
        return configured
    return next((peak for prefix, peak in PEAKS if device_kind.startswith(prefix)), None)
