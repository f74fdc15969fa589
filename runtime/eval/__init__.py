"""`huatuo-local eval` (a front-end, layer 5): the release's benchmark through core's scheduler, with
its run folder, its report and its Ray driver.

May import: huatuo_local.models and the layers below core (included); not api, serve, verify or cli.
"""
