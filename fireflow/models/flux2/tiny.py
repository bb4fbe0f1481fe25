"""Tiny random FLUX.2 pipelines, built locally with no network, for tests and smoke runs.

Full diffusers folders that load through the same loader as the real weights:

* ``flux2-dev``: a ``Flux2Pipeline`` (guidance embedded) with a tiny Mistral-3-shaped text encoder
  (``Mistral3ForConditionalGeneration``: a language model of 30 layers, so that hidden states
  10, 20 and 30 exist, plus a tiny Pixtral vision tower it never uses for text);
* ``flux2-klein``: a ``Flux2KleinPipeline`` base model (no guidance input, true CFG) with a tiny
  ``Qwen3ForCausalLM`` (27 layers: hidden states 9, 18, 27);
* ``flux2-klein-distilled``: the same with ``is_distilled=True`` (no CFG).

The transformer and the ``AutoencoderKLFlux2`` are random, the VAE's BatchNorm statistics too (so
the normalisation is not the identity). Tokenizers are character-level with a chat template of
the family's shape, written here: no vocabulary is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fireflow.models._tiny import char_tokenizer

#: The transformer: 2 double and 2 single blocks, 2 heads of 8, 16 input channels (4 VAE channels
#: x 2 x 2), text width 24 (3 stacked hidden states of width 8).
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    timestep_guidance_channels=16,
    axes_dims_rope=(2, 2, 2, 2),
)
TEXT_WIDTH = 8

#: Chat templates of the two encoders' shapes. Content may be a string or a list of text parts
#: (Flux2Pipeline sends ``[{"type": "text", "text": ...}]``).
_TEXT = (
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}"
)
MISTRAL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}[SYSTEM_PROMPT]" + _TEXT + "[/SYSTEM_PROMPT]"
    "{%- else -%}[INST]" + _TEXT + "[/INST]{%- endif -%}"
    "{%- endfor -%}"
)
QWEN_TEMPLATE = (
    "{%- for message in messages -%}<|im_start|>{{ message['role'] }}\n" + _TEXT + "<|im_end|>\n{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking -%}<think>\n\n</think>\n\n{%- endif -%}"
    "{%- endif -%}"
)


def tiny_transformer(seed: int = 0, guidance: bool = True, **overrides):
    """A random ``Flux2Transformer2DModel`` of :data:`TINY_TRANSFORMER`'s shape."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": guidance, **overrides}).eval()


def tiny_vae(seed: int = 0):
    """A random ``AutoencoderKLFlux2`` (4 latent channels, downsampling by 8) with random BN statistics."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,  # keeps large photos cheap
    ).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae


def _chat_tokenizer(template: str, specials: list[str], bos: str | None, eos: str):
    tok, _ = char_tokenizer(bos, eos, "<pad>", "<unk>", 512)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


def tiny_mistral(seed: int = 0):
    """A tokenizer and a ``Mistral3ForConditionalGeneration`` at toy size (30 text layers)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    specials = ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]"]
    tok = _chat_tokenizer(MISTRAL_TEMPLATE, specials, "<s>", "</s>")
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tok),
            hidden_size=TEXT_WIDTH,
            intermediate_size=16,
            num_hidden_layers=30,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=4,
            max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=4,
            image_size=32,
            patch_size=16,
        ),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
    )
    return tok, Mistral3ForConditionalGeneration(config).eval()


def tiny_qwen3(seed: int = 0):
    """A tokenizer and a ``Qwen3ForCausalLM`` at toy size (27 layers)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _chat_tokenizer(QWEN_TEMPLATE, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|endoftext|>")
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=TEXT_WIDTH,
        intermediate_size=16,
        num_hidden_layers=27,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
    )
    return tok, Qwen3ForCausalLM(config).eval()


def tiny_flux2_pipeline(seed: int = 0, variant: str = "flux2-dev"):
    """Every component of a FLUX.2 [dev] or [klein] pipeline at toy size, random weights, fp32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    # FLUX.2 ships FLUX.1-dev's scheduler config (the pipeline computes the shift's mu its own way).
    from fireflow.models.flux import FLUX_DEV_SCHEDULER

    if variant not in VARIANTS:
        raise ValueError(f"unknown FLUX.2 tiny variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    dev = variant == "flux2-dev"
    transformer = tiny_transformer(seed, guidance=dev)
    vae = tiny_vae(seed + 1)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    if dev:
        tok, encoder = tiny_mistral(seed + 2)
        return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tok, transformer=transformer)
    tok, encoder = tiny_qwen3(seed + 2)
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=encoder,
        tokenizer=tok,
        transformer=transformer,
        is_distilled=variant == "flux2-klein-distilled",
    )


def save_tiny(path: str | os.PathLike, variant: str = "flux2-dev", seed: int = 0) -> Path:
    """Write the tiny random FLUX.2 pipeline ``variant`` to ``path`` and return it."""
    path = Path(path)
    tiny_flux2_pipeline(seed, variant).save_pretrained(path)
    return path


#: What ``fireflow.testing`` offers from this family: variant -> writer.
VARIANTS = {"flux2-dev": save_tiny, "flux2-klein": save_tiny, "flux2-klein-distilled": save_tiny}
