"""The release's inference path rebuilt in fp32 PyTorch: the reference `verify` and the fidelity tests
measure against.

Built with transformers' and safetensors' own loaders only (nothing of huatuo-local's readers): the
configuration into Qwen2Config/LlamaConfig and CLIPVisionConfig, the tokenizer with AutoTokenizer,
the CLIP tower with CLIPVisionModel.from_pretrained. With the release's semantics: pad to square with
the mean colour, CLIPImageProcessor (PIL backend), `hidden_states[-2]` without the class token, the
`mlp2x_gelu` projector with exact GELU, chunk-wise tokenization without special tokens, image
embeddings spliced in place, greedy decoding from `inputs_embeds` with the repetition penalty over
generated tokens only. Needs the `[verify]` extra (torch, transformers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.prompt import IMAGE_TOKEN
from PIL import Image


def _torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise HuatuoError("verify needs PyTorch and transformers: pip install 'huatuo-local[verify]'") from exc
    torch.set_grad_enabled(False)
    return torch

def expand2square(img: Image.Image, color) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    result = Image.new(img.mode, (side, side), color)
    result.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return result

def _cache(out):
    # transformers 5 renamed past_key_values to cache
    return getattr(out, "cache", None) or out.past_key_values

def _read_state(folder: Path, prefix: str = "") -> dict:
    """Every tensor of a checkpoint folder under `prefix`, read by the safetensors library or torch itself
    (not by huatuo-local's readers: the reference must not share code with what it checks)."""
    torch = _torch()
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise HuatuoError(f"{folder}: no *.safetensors or pytorch_model*.bin to read")
    state = {}
    for f in files:
        part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu",
                                                                                  weights_only=True)
        state.update({k[len(prefix):]: v.float() for k, v in part.items() if k.startswith(prefix)})
    return state

def _tower_folder(checkpoint: Path, config: dict, override: str | None) -> Path | None:
    """The CLIP folder the release would load: --vision-tower, else `mm_vision_tower` (absolute, or
    relative to the checkpoint), else None (the weights are inside the checkpoint)."""
    named = override or config.get("mm_vision_tower") or ""
    for candidate in (Path(named), checkpoint / named) if named else ():
        if candidate.is_dir():
            return candidate
    return None

class OriginalModel:
    """The release's inference path in fp32 PyTorch, on a checkpoint folder.

    Built with transformers' and safetensors' own loaders only: the configuration is read into
    Qwen2Config/LlamaConfig and CLIPVisionConfig, the tokenizer with AutoTokenizer, the CLIP tower with
    CLIPVisionModel.from_pretrained and its preprocessing with the PIL CLIPImageProcessor.
    """

    def __init__(self, checkpoint: str | Path, vision_tower: str | None = None):
        import json

        torch = _torch()
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # a LLaVA config read as its language model's: expected, not news
        self.folder = Path(checkpoint)
        try:
            config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HuatuoError(f"{self.folder / 'config.json'}: cannot read ({exc}); give the checkpoint folder") \
                from None
        state = _read_state(self.folder)
        self.llm = self._language_model(config, state)
        self.tower, self.processor = self._tower(config, vision_tower)
        self.select_layer = int(config.get("mm_vision_select_layer", -2))
        h, vh = self.llm.config.hidden_size, int(config["mm_hidden_size"])
        self.projector = torch.nn.Sequential(torch.nn.Linear(vh, h), torch.nn.GELU(), torch.nn.Linear(h, h))
        self.projector.load_state_dict({k[len("model.mm_projector."):]: v for k, v in state.items()
                                        if k.startswith("model.mm_projector.")})
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            self.eos_id = config.get("eos_token_id")

    def _language_model(self, config: dict, state: dict):
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        is_qwen = "qwen" in (str(config.get("model_type", "")) + " ".join(config.get("architectures", []))).lower()
        llm_config = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "vision_config")}
        llm = Qwen2ForCausalLM(Qwen2Config(**llm_config)) if is_qwen else LlamaForCausalLM(LlamaConfig(**llm_config))
        llm_state = {n: t for n, t in state.items()
                     if n.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head"))}
        missing, unexpected = llm.load_state_dict(llm_state, strict=False)
        if unexpected or any("rotary" not in m for m in missing):
            raise HuatuoError(f"{self.folder}: the LLM weights do not fit transformers' model ({missing[:2]})")
        return llm.eval().float()

    def _tower(self, config: dict, vision_tower: str | None):
        """The CLIP tower and its preprocessing: from its own folder, else from inside the checkpoint."""
        torch = _torch()
        from transformers import CLIPVisionConfig, CLIPVisionModel
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        tower_dir = _tower_folder(self.folder, config, vision_tower)
        if tower_dir is not None:
            tower = CLIPVisionModel.from_pretrained(str(tower_dir), torch_dtype=torch.float32)
            return tower.eval().float(), CLIPImageProcessorPil.from_pretrained(str(tower_dir))
        tower = CLIPVisionModel(CLIPVisionConfig(**config["vision_config"]))  # its configuration in the config
        inside = "model.vision_tower.vision_tower."
        # Stored with or without `vision_model.` (transformers 4 and 5 differ): named as this version names them.
        ours = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""
        weights = {ours + k.removeprefix("vision_model."): v for k, v in _read_state(self.folder, inside).items()}
        missing, unexpected = tower.load_state_dict(weights, strict=False)
        if unexpected or any("position_ids" not in m for m in missing):
            raise HuatuoError(f"{self.folder}: the tower weights do not fit CLIPVisionModel ({missing[:2]})")
        size = tower.config.image_size
        return tower.eval().float(), CLIPImageProcessorPil(size={"shortest_edge": size},
                                                           crop_size={"height": size, "width": size})

    def pixel_values(self, path):
        torch = _torch()
        img = Image.open(path).convert("RGB")
        img = expand2square(img, tuple(int(x * 255) for x in self.processor.image_mean))
        return torch.as_tensor(np.asarray(self.processor(img, return_tensors="np")["pixel_values"]))

    def image_features(self, path):
        out = self.tower(self.pixel_values(path), output_hidden_states=True)
        return self.projector(out.hidden_states[self.select_layer][:, 1:])[0]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_embeds(self, prompt: str, image_paths: list):
        torch = _torch()
        chunks = prompt.split(IMAGE_TOKEN)
        embed = self.llm.get_input_embeddings()
        parts = []
        for i, chunk in enumerate(chunks):
            ids = self.tokenize(chunk)
            if ids:
                parts.append(embed(torch.tensor(ids)))
            if i < len(image_paths):
                parts.append(self.image_features(image_paths[i]))
        return torch.cat(parts)[None]

    def generate(self, prompt: str, image_paths: list, max_new_tokens: int = 32, repetition_penalty: float = 1.2,
                 forced: list[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
        """Greedy decoding from inputs_embeds (or the `forced` tokens); tokens and every step's logits."""
        torch = _torch()
        out = self.llm(inputs_embeds=self.prompt_embeds(prompt, image_paths), use_cache=True)
        cache, logits = _cache(out), out.logits[0, -1]
        tokens: list[int] = []
        steps: list[np.ndarray] = []
        for step in range(max_new_tokens if forced is None else len(forced)):
            steps.append(logits.double().numpy().copy())
            if forced is not None:
                tok = forced[step]
            else:
                scores = logits.clone().double()
                if step == 0 and self.eos_id is not None:
                    scores[self.eos_id] = -float("inf")  # min_new_tokens=1
                if tokens and repetition_penalty != 1.0:
                    idx = torch.tensor(sorted(set(tokens)))
                    vals = scores[idx]
                    scores[idx] = torch.where(vals < 0, vals * repetition_penalty, vals / repetition_penalty)
                tok = int(torch.argmax(scores))
                if tok == self.eos_id:
                    break
            tokens.append(tok)
            out = self.llm(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
            cache, logits = _cache(out), out.logits[0, -1]
        return tokens, steps
