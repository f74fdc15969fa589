"""Other machines lend their memory (layer 2): llama.cpp's RPC backend, the client side (probing and
registering workers, splitting layers) and `rpc-worker` (llama.cpp's own server, from the same library).

May import: huatuo_local.models, runtime.system, runtime.llama.
"""
