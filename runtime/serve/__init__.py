"""`huatuo-local serve` (a front-end, layer 5): an OpenAI-compatible API and the page, over core's
scheduler. Routes only check, translate and stream; the guard keeps other web pages out.

May import: huatuo_local.models and the layers below core (included); not api, eval, verify or cli.
"""
