"""The PyTorch reference: the release's inference path on a checkpoint, in fp32.

Built from transformers' own Qwen2 / Llama and CLIPVisionModel with the semantics of
REFERENCE.md: pad to square with the mean colour, CLIPImageProcessor (PIL backend),
`hidden_states[-2]` without the class token, the `mlp2x_gelu` projector (exact erf
GELU), chunk-wise tokenization around `<image>` without special tokens, embeddings
spliced in place, decoding from `inputs_embeds` (repetition penalty over generated
tokens only). Nothing here imports huatuo_local.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

torch.set_grad_enabled(False)


def expand2square(img: Image.Image, color) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    if w > h:
        result = Image.new(img.mode, (w, w), color)
        result.paste(img, (0, (w - h) // 2))
        return result
    result = Image.new(img.mode, (h, h), color)
    result.paste(img, ((h - w) // 2, 0))
    return result


class Reference:
    def __init__(self, info: dict):
        from tiny_models import PREPROCESSOR, clip_config, clip_stored
        from transformers import (
            AutoTokenizer,
            CLIPVisionConfig,
            CLIPVisionModel,
            LlamaConfig,
            LlamaForCausalLM,
            Qwen2Config,
            Qwen2ForCausalLM,
        )
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        spec, cfg, stored = info["spec"], info["config"], info["stored"]
        self.ckpt = Path(info["ckpt"])
        common = dict(
            hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"], vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg["rms_norm_eps"], max_position_embeddings=cfg["max_position_embeddings"],
            tie_word_embeddings=False, rope_theta=cfg["rope_theta"],
        )
        if spec.arch == "qwen2":
            self.llm = Qwen2ForCausalLM(Qwen2Config(**common))
        else:
            self.llm = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
        self.llm.config._attn_implementation = "eager"
        llm_state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stored.items()
                     if k.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head"))}
        missing, unexpected = self.llm.load_state_dict(llm_state, strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
        self.llm.eval().float()

        self.tower = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in clip_config(spec).items()
                                                         if k not in ("architectures", "model_type")}))
        tower_state = {k: torch.from_numpy(np.ascontiguousarray(v))
                       for k, v in clip_stored(info).items()}
        missing, unexpected = self.tower.load_state_dict(tower_state, strict=False)
        assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
        self.tower.eval().float()

        h, vh = cfg["hidden_size"], cfg["mm_hidden_size"]
        self.projector = torch.nn.Sequential(torch.nn.Linear(vh, h), torch.nn.GELU(), torch.nn.Linear(h, h))
        self.projector.load_state_dict({
            "0.weight": torch.from_numpy(stored["model.mm_projector.0.weight"].copy()),
            "0.bias": torch.from_numpy(stored["model.mm_projector.0.bias"].copy()),
            "2.weight": torch.from_numpy(stored["model.mm_projector.2.weight"].copy()),
            "2.bias": torch.from_numpy(stored["model.mm_projector.2.bias"].copy()),
        })
        self.processor = CLIPImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items()
                                                  if k != "image_processor_type"})
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.ckpt))
        tcfg = json.loads((self.ckpt / "tokenizer_config.json").read_text())
        self.eos_id = self.tokenizer.convert_tokens_to_ids(tcfg["eos_token"])

    # --- the release's pieces --------------------------------------------------------

    def pixel_values(self, path) -> torch.Tensor:
        img = Image.open(path).convert("RGB")
        color = tuple(int(x * 255) for x in self.processor.image_mean)
        img = expand2square(img, color)
        return torch.as_tensor(np.asarray(self.processor(img, return_tensors="np")["pixel_values"]))

    def image_features(self, path) -> torch.Tensor:
        out = self.tower(self.pixel_values(path), output_hidden_states=True)
        feats = out.hidden_states[-2][:, 1:]
        return self.projector(feats)[0]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_embeds(self, prompt: str, image_paths: list) -> tuple[torch.Tensor, list]:
        chunks = prompt.split("<image>")
        assert len(chunks) - 1 == len(image_paths)
        embed = self.llm.get_input_embeddings()
        parts, layout = [], []
        for i, chunk in enumerate(chunks):
            ids = self.tokenize(chunk)
            if ids:
                parts.append(embed(torch.tensor(ids)))
                layout.extend(ids)
            if i < len(image_paths):
                feats = self.image_features(image_paths[i])
                parts.append(feats)
                layout.append(("image", feats.shape[0]))
        return torch.cat(parts)[None], layout

    def generate(self, prompt: str, image_paths: list, max_new_tokens: int = 32,
                 repetition_penalty: float = 1.2) -> tuple[list[int], list[np.ndarray]]:
        """Greedy decoding from inputs_embeds; returns tokens and the logits at every step."""
        embeds, _ = self.prompt_embeds(prompt, image_paths)
        out = self.llm(inputs_embeds=embeds, use_cache=True)
        past, logits = (getattr(out, "cache", None) or out.past_key_values), out.logits[0, -1]
        tokens: list[int] = []
        all_logits = []
        for step in range(max_new_tokens):
            all_logits.append(logits.double().numpy().copy())
            scores = logits.clone().double()
            if step == 0:
                scores[self.eos_id] = -float("inf")  # min_new_tokens=1
            if tokens and repetition_penalty != 1.0:
                idx = torch.tensor(sorted(set(tokens)))
                vals = scores[idx]
                scores[idx] = torch.where(vals < 0, vals * repetition_penalty, vals / repetition_penalty)
            tok = int(torch.argmax(scores))
            if tok == self.eos_id:
                break
            tokens.append(tok)
            out = self.llm(input_ids=torch.tensor([[tok]]), cache=past, use_cache=True)
            past, logits = (getattr(out, "cache", None) or out.past_key_values), out.logits[0, -1]
        return tokens, all_logits
