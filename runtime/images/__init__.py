"""The picture the model sees (layer 1): one loader for Pillow formats, 16-bit images and DICOM, sizes
checked before decoding, padding to square and CLIP's resize exactly as the release does.

May import: huatuo_local.models, runtime.system.
"""
