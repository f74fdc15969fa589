"""Numbers from llama.cpp's C headers that huatuo-local passes through ctypes.

They are copied here, not guessed: `tests/test_native.py` reads each one from the pinned
llama.cpp's own headers (`ggml.h`, `ggml-backend.h`, `llama.h` inside the engine's source
distribution) and fails when one differs. A wrong device-type number once made every CUDA
GPU invisible (issue 20); this is where such a number would be caught.
"""

from __future__ import annotations

# ggml.h: enum ggml_log_level
GGML_LOG_LEVEL_ERROR = 4

# ggml.h: enum ggml_type (the KV cache types huatuo-local offers)
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8

# ggml.h: enum ggml_op (the one an importance matrix listens to)
GGML_OP_MUL_MAT = 29

# ggml-backend.h: enum ggml_backend_dev_type
GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_BACKEND_DEVICE_TYPE_GPU = 1
GGML_BACKEND_DEVICE_TYPE_IGPU = 2
GGML_BACKEND_DEVICE_TYPE_ACCEL = 3

# llama.h: enum llama_load_mode
LLAMA_LOAD_MODE_NONE = 0
LLAMA_LOAD_MODE_MMAP = 1

# llama.h: enum llama_flash_attn_type
LLAMA_FLASH_ATTN_TYPE_AUTO = -1
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0
LLAMA_FLASH_ATTN_TYPE_ENABLED = 1

# llama.h: enum llama_token_attr
LLAMA_TOKEN_ATTR_CONTROL = 1 << 3
LLAMA_TOKEN_ATTR_BYTE = 1 << 5
