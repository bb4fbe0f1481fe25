"""What the families' tiny test pipelines share: a character-level tokenizer built locally."""

from __future__ import annotations


def tiny_vae(shift_factor: float, scaling_factor: float, latent_channels: int = 4):
    """A random ``AutoencoderKL`` that downsamples by 8 like the real ones, at toy width."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(4, 4, 8, 8),  # 4 blocks: downsampling by 8
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        mid_block_add_attention=False,  # keeps large photos cheap
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    ).eval()


def char_tokenizer(bos: str | None, eos: str, pad: str, unk: str, max_length: int):
    """A character-level tokenizer (letters, digits, punctuation) that adds ``bos``/``eos``.

    Built with the ``tokenizers`` library, so it needs no vocabulary download and works with
    every transformers version; the pipelines only use the standard tokenizer call.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (pad, eos, unk, bos) if t is not None]
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,'!?-:;()\"")
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + alphabet))}
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in (bos, eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=max_length,
    ), vocab
