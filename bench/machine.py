"""One line naming the machine a bench ran on: CPU model, cores, bf16 matmul support.

bf16 speed depends on the CPU more than on the code (AMX or AVX512-BF16 make bf16
matmuls several times faster than fp32; without them torch falls back to slow paths),
so every bench prints which it had.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    model, flags = platform.processor() or platform.machine(), set[str]()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                model = val.strip()
            elif key.strip() == "flags":
                flags = set(val.split())
    bf16: list[str] = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    bf16 = bf16 or ["no AMX/AVX512-BF16"]
    return f"{model}, {os.cpu_count()} cores, {'+'.join(bf16)}"
