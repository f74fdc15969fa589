"""huatuo-local: HuatuoGPT-Vision on your own machine, offline, through llama.cpp.

The package is one namespace over the repository's top-level folders:
`huatuo_local.models` (models/), `huatuo_local.convert` (convert/), `huatuo_local.runtime`
(runtime/).
"""

__version__ = "0.1.0"
