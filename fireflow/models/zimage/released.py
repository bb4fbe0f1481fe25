"""Z-Image's released transformer (``transformer/config.json``), for the random-weight benchmark."""

from __future__ import annotations

from fireflow.models._released import Released, prompt_and_negative
from fireflow.models.zimage.tiny import TINY_TRANSFORMER

#: Qwen3-4B's hidden states (unpadded: equal lengths need no mask), and the negative prompt's.
embeds = prompt_and_negative("cap_feat_dim")


RELEASED = {
    "z-image-turbo": Released(
        repo="Tongyi-MAI/Z-Image-Turbo",
        transformer="ZImageTransformer2DModel",
        config=dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=3840,
            n_layers=30,
            n_refiner_layers=2,
            n_heads=30,
            n_kv_heads=30,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=2560,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[32, 48, 48],
            axes_lens=[1536, 512, 512],
        ),
        tiny=TINY_TRANSFORMER,
        embeds=embeds,
        text_len=128,
        note="text length 128 (the pipeline passes a prompt's own length, at most 512)",
    ),
}
