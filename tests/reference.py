"""The PyTorch reference used by the fidelity tests: `huatuo_local.runtime.verify.reference.OriginalModel`.

It rebuilds the release's inference path from the checkpoint files with transformers
(see that module); the tests only add what they need to know about the tiny checkpoints.
"""

from __future__ import annotations

from huatuo_local.runtime.verify.reference import OriginalModel


class Reference(OriginalModel):
    def __init__(self, info: dict):
        super().__init__(info["ckpt"], str(info["tower_dir"]) if info["spec"].tower == "separate" else None)
