"""An I2_S reader written from the layout's description, independent of wft's packer and of
the read-back's unpacker (wftool.export.validate.unpack_i2_s)."""

import numpy as np


def reference_unpack_i2_s(data: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """(n int8 codes, fp32 delta). Value i: group i // 128, byte i % 32 of it, bits 7-6 /
    5-4 / 3-2 / 1-0 by (i % 128) // 32, stored as code + 1; the delta is the first 4 bytes of
    the tail after the n / 4 code bytes."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    groups = data[: n // 4].reshape(-1, 32)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8)
    codes = (groups[:, None, :] >> shifts[None, :, None]) & 3  # [group, quarter, byte]
    delta = float(np.frombuffer(data[n // 4 : n // 4 + 4].tobytes(), dtype="<f4")[0])
    return codes.reshape(-1).astype(np.int8) - 1, delta
