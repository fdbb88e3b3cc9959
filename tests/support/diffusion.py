"""Tiny seeded Stable-Diffusion-shaped pipelines (latent UNet with SD's block types, a VAE, a CLIP text
encoder), in the manner of diffusers' ``get_dummy_components()``: each part built after a
``torch.manual_seed``, offline, in well under a second.

The weights are scaled up from their defaults so that an intervention moves the images by far
more than the tolerances (with default init the UNet's output barely depends on the text).
"""

from __future__ import annotations

import torch

from interventions.modalities.text_to_image.pipeline import DiffusionPipe, word_tokenizer

WORDS = "a an photo of red blue green yellow circle square triangle cat dog car".split()
#: SD v1.x's UNet layout: CrossAttnDown x3 + Down, mid, Up + CrossAttnUp x3, layers_per_block 2.
SD_V1_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
SD_V1_ATTN2 = ([f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)]
               + ["mid_block.attentions.0.transformer_blocks.0.attn2"]
               + [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in (1, 2, 3) for a in range(3)])


def _scale(module: torch.nn.Module, factor: float, only: tuple[str, ...] = ("weight",)) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(only) and p.dim() >= 2:
                p.mul_(factor)


def tiny_sd(seed: int = 0, max_length: int = 8) -> DiffusionPipe:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_tokenizer(WORDS, max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    _scale(unet, 3.0)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48,
                                        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=max_length,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_factor=4.0))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DiffusionPipe(f"tiny-sd-{seed}", unet.eval(), text.eval(), tokenizer, scheduler, vae.eval(), steps=3,
                         guidance=3.0)


def sd_v1_unet():
    """A UNet with SD v1.x's exact module tree (its names) but tiny channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8, 8, 8),
                                cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4, **SD_V1_BLOCKS)


class ChannelEvaluator:
    """A stand-in image evaluator for random pipelines: an image "shows" a word when the mean of one
    colour channel exceeds a threshold (a fixed rule, so a trace has a well-defined metric)."""

    CHANNELS = {"red": 0, "green": 1, "blue": 2}

    def __init__(self, thresholds: dict[str, float]):
        self.thresholds = thresholds

    def shows(self, images: torch.Tensor, word: str) -> torch.Tensor:
        return images[:, self.CHANNELS[word]].float().mean(dim=(1, 2)) > self.thresholds[word]


def tiny_lm_conditioned(seed: int = 0, max_length: int = 8) -> DiffusionPipe:
    """The scenes testbed's shape in miniature: a pixel-space UNet reading a decoder language model's
    final hidden states (a tiny seeded LlamaModel: `layers`, `self_attn.o_proj`, causal)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaModel

    tokenizer = word_tokenizer(WORDS, max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    _scale(unet, 3.0)
    torch.manual_seed(seed)
    lm = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_length,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              set_alpha_to_one=True)
    return DiffusionPipe(f"tiny-lm-{seed}", unet.eval(), lm.eval().requires_grad_(False), tokenizer, scheduler,
                         None, steps=3, guidance=3.0)
