"""Everything that runs a converted model, in layers; each imports only the layers below it.

    cli/                        the `huatuo-local` command (top): parses, checks, calls below
    api.py  serve/  eval/  verify/   front-ends: the Python class, the HTTP server, the benchmark, the PyTorch check
    core/                       conversations on one scheduler: items, sampling, prefix cache, sessions, loading
    engine/                     one loaded model: llama.cpp + libmtmd primitives, load modes, the vision probe
    rpc/                        other machines' memory through llama.cpp's RPC backend
    llama/  images/             llama.cpp's registry, constants and logs; the picture the model sees
    system.py                   this machine's cores and memory

`tests/test_architecture.py` reads the imports (without running them) and fails on a cycle or on an
import that points up a layer, or across front-ends.
"""
