"""The GGUF metadata keys this project writes and reads, by name: gguf's own constants (`gguf.Keys`), plus
the one llama.cpp reads that gguf does not name. Nothing else spells a key; the mmproj header is written
here once, for the converter and the engine's probe alike."""

from __future__ import annotations

from collections.abc import Sequence

from gguf import GGUFValueType, GGUFWriter, Keys

ARCHITECTURE = Keys.General.ARCHITECTURE
FILE_KIND = Keys.General.TYPE  # "model", "mmproj", "imatrix"
ALIGNMENT = Keys.General.ALIGNMENT
EOS_ID = Keys.Tokenizer.EOS_ID

HAS_VISION_ENCODER = Keys.Clip.HAS_VISION_ENCODER
PROJECTOR_TYPE = Keys.Clip.PROJECTOR_TYPE
USE_GELU = Keys.ClipVision.USE_GELU
IMAGE_SIZE = Keys.ClipVision.IMAGE_SIZE
PATCH_SIZE = Keys.ClipVision.PATCH_SIZE
VISION_WIDTH = Keys.ClipVision.EMBEDDING_LENGTH
VISION_FFN = Keys.ClipVision.FEED_FORWARD_LENGTH
PROJECTION_DIM = Keys.ClipVision.PROJECTION_DIM
VISION_HEADS = Keys.ClipVision.Attention.HEAD_COUNT
VISION_NORM_EPS = Keys.ClipVision.Attention.LAYERNORM_EPS
VISION_BLOCKS = Keys.ClipVision.BLOCK_COUNT
IMAGE_MEAN = Keys.ClipVision.IMAGE_MEAN
IMAGE_STD = Keys.ClipVision.IMAGE_STD
# llama.cpp's KEY_FEATURE_LAYER (tools/mtmd/clip-impl.h), which gguf-py does not define: the hidden states the
# projector takes. Without it clip.cpp stops one block before the last one kept.
FEATURE_LAYER = "clip.vision.feature_layer"

IMATRIX_DATASETS = Keys.IMatrix.DATASETS
IMATRIX_CHUNK_COUNT = Keys.IMatrix.CHUNK_COUNT
IMATRIX_CHUNK_SIZE = Keys.IMatrix.CHUNK_SIZE


def llm_key(template: str, arch: str) -> str:
    """A per-architecture key: llm_key(Keys.LLM.BLOCK_COUNT, "qwen2") == "qwen2.block_count"."""
    return template.format(arch=arch)


BLOCK_COUNT = Keys.LLM.BLOCK_COUNT
EMBEDDING_LENGTH = Keys.LLM.EMBEDDING_LENGTH
HEAD_COUNT = Keys.Attention.HEAD_COUNT
HEAD_COUNT_KV = Keys.Attention.HEAD_COUNT_KV


def write_vision_header(writer: GGUFWriter, *, image_size: int, patch_size: int, width: int, ffn: int,
                        projection_dim: int, heads: int, norm_eps: float, blocks: int, mean: Sequence[float],
                        std: Sequence[float], gelu: bool) -> None:
    """The keys of a LLaVA MLP projector's GGUF as llama.cpp's clip.cpp reads them. `blocks` is the number of
    encoder blocks kept, the last of which gives the projector's input (the release's selected layer)."""
    writer.add_bool(HAS_VISION_ENCODER, True)
    writer.add_string(PROJECTOR_TYPE, "mlp")
    writer.add_uint32(IMAGE_SIZE, image_size)
    writer.add_uint32(PATCH_SIZE, patch_size)
    writer.add_uint32(VISION_WIDTH, width)
    writer.add_uint32(VISION_FFN, ffn)
    writer.add_uint32(PROJECTION_DIM, projection_dim)
    writer.add_uint32(VISION_HEADS, heads)
    writer.add_float32(VISION_NORM_EPS, norm_eps)
    writer.add_uint32(VISION_BLOCKS, blocks)
    writer.add_key_value(FEATURE_LAYER, [blocks], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    writer.add_array(IMAGE_MEAN, [float(x) for x in mean])
    writer.add_array(IMAGE_STD, [float(x) for x in std])
    if gelu:
        writer.add_bool(USE_GELU, True)
