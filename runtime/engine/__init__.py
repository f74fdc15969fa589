"""One loaded model (layer 3): the llama.cpp context with N sequences and libmtmd's vision context, as
primitives (tokenize, decode a batch, encode an image, per-sequence state); how the weights are loaded;
the build's identity; the run-time proof that libmtmd encodes LLaVA images right (probe).

Which sequence runs what, and when, is core's business. May import: huatuo_local.models, runtime.system,
runtime.llama, runtime.images, runtime.rpc.
"""
