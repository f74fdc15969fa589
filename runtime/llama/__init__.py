"""llama.cpp as a library (layer 1): its modules (bindings), the C constants huatuo-local passes
(checked against the pinned headers), its device registry and GPUs (devices), its log (logs).

May import: huatuo_local.models, runtime.system.
"""
