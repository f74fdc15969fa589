"""Importance matrices from image and text prompts (a front-end, layer 5): the calibration
conversations (calibration.py) run through the model itself, images through its own vision encoder,
every layer weight's inputs squared and summed per column (imatrix.py), for llama.cpp's low-bit quants.

May import: huatuo_local.models and the layers below core (included); not api, serve, eval, verify or cli.
"""
