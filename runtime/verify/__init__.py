"""`huatuo-local verify` (a front-end, layer 5): the release's PyTorch inference path rebuilt with
transformers, and converted models measured against it.

May import: huatuo_local.models and the layers below core (included); not api, serve, eval or cli.
"""
