"""Conversations on one scheduler (layer 4): what a prompt is made of (items), the release's sampling,
the one loop that batches every sequence (scheduler), the on-disk prefix cache, a conversation
(session), and loading a model the one way every front-end does (loading).

May import: huatuo_local.models and every layer below (system, llama, images, rpc, engine).
"""
