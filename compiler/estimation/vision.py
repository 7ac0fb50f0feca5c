"""The vision tower of a multimodal checkpoint whose language model the planner trains.

A Gemma-3 checkpoint of 4B parameters or more (`Gemma3ForConditionalGeneration`) holds a SigLIP
image encoder and a projector into the text model's width next to its language model. Training
on text alone runs only the language model, but the tower's weights are loaded with it: they count
in the model's total and in the memory its weights take, never in FLOPs or trainable parameters.
Standard library only: `recipe validate` reads the catalog, which records these configs.
"""

from __future__ import annotations

from typing import Any

# Module names of the tower and the projector in transformers' Gemma3Model; LoRA and freeze leave
# them alone (peft's `exclude_modules` takes this regular expression).
VISION_MODULES = r".*(vision_tower|multi_modal_projector).*"


def vision_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The image encoder's config of a multimodal Gemma-3 config.json; None for a text model."""
    nested = config.get("vision_config")
    if config.get("model_type") == "gemma3" and isinstance(nested, dict):
        return dict(nested)
    return None


def vision_parameters(vision: dict[str, Any], text_hidden: int) -> int:
    """Parameters of a SigLIP vision tower (transformers' SiglipVisionModel without its pooling
    head) plus Gemma-3's multimodal projector, from the vision config.

    SiglipVisionEmbeddings: a patch x patch convolution from 3 channels to the hidden width (with
    bias) and one learned position per patch ((image / patch)^2 of them). Each encoder layer: two
    LayerNorms (weight and bias), q/k/v/out projections (hidden x hidden, with bias) and an MLP
    hidden -> intermediate -> hidden (with biases). Then the post-LayerNorm, and the pooling head
    when `vision_use_head` (Gemma-3's configs set it false).
    Gemma3MultiModalProjector: an RMSNorm over the vision width (`mm_soft_emb_norm`) and one
    vision x text matrix (`mm_input_projection_weight`); its average pooling holds no weights.
    """
    # defaults: SiglipVisionConfig's, which a config.json may leave out
    h = int(vision.get("hidden_size", 768))
    i = int(vision.get("intermediate_size", 3072))
    layers = int(vision.get("num_hidden_layers", 12))
    patch = int(vision.get("patch_size", 16))
    image = int(vision.get("image_size", 224))
    channels = int(vision.get("num_channels", 3))
    embeddings = channels * patch * patch * h + h + (image // patch) ** 2 * h
    mlp = (h * i + i) + (i * h + h)
    layer = 2 * 2 * h + 4 * (h * h + h) + mlp
    # SiglipMultiheadAttentionPoolingHead: a probe token, nn.MultiheadAttention (packed q/k/v and an
    # output projection, with biases), a LayerNorm and an MLP
    head = h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + mlp if vision.get("vision_use_head", True) else 0
    tower = embeddings + layers * layer + 2 * h + head
    projector = h + h * text_hidden
    return tower + projector
