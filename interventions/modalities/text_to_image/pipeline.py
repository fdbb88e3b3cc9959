"""Text-to-image models: load a pipeline's parts, encode prompts, sample images, and name its sites.

One loader serves the project's testbed and real Stable Diffusion v1.x folders:

- ``"shapes-diffusion"``: the coloured-shapes testbed in ``checkpoints/`` (pixel space,
  no VAE, a small CLIP text encoder trained with it; see `interventions.testbeds.shapes`);
- ``"scenes-smollm2"``: the scenes testbed (pixel space, 24x24): its UNet reads the hidden
  states of the frozen SmolLM2-135M through cross-attention, as Imagen reads T5's; only the
  UNet is in ``checkpoints/`` (see `interventions.testbeds.scenes`);
- a local diffusers folder with ``unet/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/`` and (for latent models) ``vae/``, as ``CompVis/stable-diffusion-v1-4``
  is laid out.

Sampling is our own short DDIM loop with classifier-free guidance, so that every
image is a pure function of (prompt embeddings, seed): batched equals sequential,
and an intervention on the text encoder or on the UNet's cross-attention changes
nothing else.

>>> pipe = load_pipeline("shapes-diffusion")                             # doctest: +SKIP
>>> images = pipe.generate(["a red circle"] * 4, seeds=[0, 1, 2, 3])       # doctest: +SKIP
>>> images.shape                                                          # doctest: +SKIP
torch.Size([4, 3, 16, 16])

Sites (`DiffusionSites`): the text encoder's ``text_embed`` and per layer
``text_hidden`` / ``text_mlp`` / ``text_attention`` (with ``text_attention_out`` for
the self-attention's output projection), and the UNet's cross-attention layers
``attn2`` in the order the UNet runs them (down blocks, mid block, up blocks), each
with its ``to_k`` / ``to_v`` projections. The names are found from the module types,
so the same table covers the testbed and SD v1.x (16 ``attn2`` layers:
``down_blocks.{0,1,2}.attentions.{0,1}``, ``mid_block.attentions.0``,
``up_blocks.{1,2,3}.attentions.{0,1,2}``, each ``.transformer_blocks.0.attn2``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from interventions.core.errors import ModelNotAvailable, SpecError, short, suggest
from interventions.core.paths import CHECKPOINTS
from interventions.models.families import SCENES, SHAPES, is_text_to_image, local_folder

TESTBED = SHAPES
TESTBED_FILE = "shapes_diffusion.safetensors"
SCENES_FILE = "scenes_smollm2_unet.safetensors"
DIFFUSION_BUILTINS = (TESTBED, SCENES)
is_diffusion_model = is_text_to_image


@dataclass(eq=False)     # hashed by identity: deltas keep per-model state in a WeakKeyDictionary
class DiffusionPipe:
    """The parts of a text-to-image pipeline that Lesion drives (diffusers/transformers objects)."""

    name: str
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    vae: nn.Module | None = None
    steps: int = 25
    guidance: float = 1.5
    meta: dict = field(default_factory=dict)

    # ----------------------------------------------------------------- text
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's length (77 for SD), as the UNet was trained to see."""
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return enc.input_ids.to(self.device)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``Float[Tensor, "n tokens d"]``: the text encoder's last hidden state, the UNet's context."""
        return self.encode_ids(self.tokenize(prompts))

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=ids.to(self.device)).last_hidden_state

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """The starting latents: one CPU generator per seed, so an image never depends on its batch."""
        cfg = self.unet.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(rows).to(self.device)

    # ----------------------------------------------------------------- images
    @torch.no_grad()
    def sample(self, context: torch.Tensor, seeds: list[int], *, steps: int | None = None,
               guidance: float | None = None, uncond: torch.Tensor | None = None,
               unet_hook=None, batch: int = 256) -> torch.Tensor:
        """Images ``Float[Tensor, "n 3 H W"]`` in [0, 1] from UNet contexts, DDIM (eta 0), guided.

        `unet_hook(step, rows, x, t, context2)` may wrap each UNet call: it gets the doubled
        (unconditional, conditional) context of the rows ``rows`` and returns the noise prediction.
        """
        steps = self.steps if steps is None else steps
        guidance = self.guidance if guidance is None else guidance
        uncond = self.encode([""])[0] if uncond is None else uncond
        out = []
        for lo in range(0, len(seeds), batch):
            rows = slice(lo, lo + batch)
            out.append(self._sample_rows(context[rows], list(seeds[rows]), steps, guidance, uncond,
                                         unet_hook, rows))
        return torch.cat(out)

    def _sample_rows(self, context, seeds, steps, guidance, uncond, unet_hook, rows):
        n = len(seeds)
        self.scheduler.set_timesteps(steps)
        x = self.noise(seeds) * self.scheduler.init_noise_sigma
        context2 = torch.cat([uncond.expand(n, -1, -1), context])
        for step, t in enumerate(self.scheduler.timesteps):
            x2 = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            if unet_hook is None:
                eps = self.unet(x2, t, encoder_hidden_states=context2).sample
            else:
                eps = unet_hook(step, rows, x2, t, context2)
            eps_u, eps_c = eps.chunk(2)
            x = self.scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        return self.decode(x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return ((x + 1) / 2).clamp(0, 1)

    def generate(self, prompts: list[str], seeds: list[int], **kw) -> torch.Tensor:
        """Images for `prompts` (one per seed, matched by index)."""
        if len(prompts) != len(seeds):
            raise SpecError("seeds", list(seeds), f"one seed per prompt ({len(prompts)} prompts)")
        return self.sample(self.encode(prompts), list(seeds), **kw)

    def __call__(self, prompt: str | list[str], *, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, num_images_per_prompt: int = 1, seed: int = 0) -> torch.Tensor:
        """The `StableDiffusionPipeline`-style call: images ``(prompts x num_images_per_prompt, 3, H, W)``,
        image k of every prompt from seed ``seed + k``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = [p for p in prompts for _ in range(num_images_per_prompt)]
        seeds = [seed + k for _ in prompts for k in range(num_images_per_prompt)]
        return self.generate(rows, seeds, steps=num_inference_steps, guidance=guidance_scale)

    # ----------------------------------------------------------------- parts
    def named_parameters(self):
        """Every trainable tensor, named as deltas name them: ``unet.<...>``, ``text_encoder.<...>``."""
        for prefix, module in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            for name, p in module.named_parameters():
                yield f"{prefix}.{name}", p

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def to(self, device) -> "DiffusionPipe":
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.to(device)
        return self


# ------------------------------------------------------------------------- sites
class DiffusionSites:
    """Module paths of a pipeline's sites, relative to the pipe (``unet.`` / ``text_encoder.`` prefixed)."""

    def __init__(self, pipe: DiffusionPipe):
        self.cross_attention = cross_attention_layers(pipe.unet)
        enc = pipe.text_encoder
        # A decoder language model (LlamaModel: `layers`, `self_attn.o_proj`) or CLIP (`encoder.layers`,
        # `self_attn.out_proj`); transformers 5 flattened CLIPTextModel (no `.text_model`), 4.x nests it.
        self.decoder = hasattr(enc, "layers") and hasattr(enc, "embed_tokens")
        self.text_root = "text_model." if hasattr(enc, "text_model") else ""
        self.text_layers = len(enc.layers if self.decoder else enc.get_submodule(self.text_root + "encoder.layers"))

    def text(self, site: str, layer: int | None = None) -> str:
        """Path inside the text encoder: ``text_embed`` or a per-layer site."""
        if site == "text_embed":
            return "embed_tokens" if self.decoder else self.text_root + "embeddings"
        if layer is None or not 0 <= layer < self.text_layers:
            raise SpecError("layers", layer, f"a text-encoder layer in 0..{self.text_layers - 1}")
        base = f"layers[{layer}]" if self.decoder else f"{self.text_root}encoder.layers[{layer}]"
        table = {"text_hidden": base, "text_mlp": f"{base}.mlp", "text_attention": f"{base}.self_attn",
                 "text_attention_out": f"{base}.self_attn." + ("o_proj" if self.decoder else "out_proj")}
        if site not in table:
            raise SpecError("sites", site, "one of " + ", ".join(repr(s) for s in ("text_embed", *table)))
        return table[site]

    def projections(self) -> list[str]:
        """The UNet's cross-attention key and value projections, as parameter names of the pipe."""
        return [f"unet.{name}.{proj}.weight" for name in self.cross_attention for proj in ("to_k", "to_v")]


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention (``attn2``) modules, in the order the UNet runs them."""
    names = [n for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_k")]
    group = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def order(name: str):
        head = name.split(".")[0]
        return (group.get(head, 3), [int(p) if p.isdigit() else 0 for p in name.split(".")])

    return sorted(names, key=order)


# ------------------------------------------------------------------------- loading
def load_pipeline(name: str, *, device: str | torch.device = "cpu", steps: int | None = None,
                  guidance: float | None = None) -> DiffusionPipe:
    """The testbed by name, or a local diffusers folder (Stable Diffusion v1.x layout)."""
    if name == TESTBED:
        pipe = _load_testbed(CHECKPOINTS / TESTBED_FILE)
    elif name == SCENES:
        pipe = load_scenes_testbed(CHECKPOINTS / SCENES_FILE)
    elif local_folder(name) is not None:
        try:
            pipe = _load_folder(local_folder(name))
        except (OSError, ValueError, KeyError) as err:
            raise ModelNotAvailable(f"`model`: {short(name)} is not a diffusers pipeline folder that loads "
                                    f"({err.__class__.__name__}: {short(str(err), 300)})") from None
    else:
        raise ModelNotAvailable(
            f"`model`: got {short(name)}; expected {TESTBED!r}{suggest(name, DIFFUSION_BUILTINS)} or a local diffusers "
            "folder (unet/, text_encoder/, tokenizer/, scheduler/, vae/); nothing is downloaded here")
    pipe.steps = pipe.steps if steps is None else steps
    pipe.guidance = pipe.guidance if guidance is None else guidance
    return pipe.to(device)


def _load_folder(path: Path) -> DiffusionPipe:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        vae = AutoencoderKL.from_pretrained(path / "vae") if (path / "vae").is_dir() else None
    except (OSError, ValueError) as err:
        raise ModelNotAvailable(f"`model`: {str(path)!r} is not a loadable diffusers pipeline folder ({err})") from None
    steps = 25
    guidance = 7.5 if vae is not None else 1.5
    return DiffusionPipe(str(path), unet.eval(), text_encoder.eval(), tokenizer, scheduler, vae, steps, guidance)


# ------------------------------------------------------------------------- the testbed
def testbed_configs(vocab_size: int, max_length: int = 8) -> tuple[dict, dict]:
    """(UNet config, CLIP text config) of the coloured-shapes testbed: a design measured to train on a 2-core
    CPU in under half an hour (1.7M-parameter UNet, cross-attention at 8x8 and 4x4, a 2-layer CLIP)."""
    unet = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=max_length, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    return unet, text


def word_tokenizer(words: list[str], max_length: int = 8):
    """A whole-word tokenizer (``<bos> words <eos> <pad>...``) for a small caption vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def build_testbed(words: list[str], seed: int = 0, max_length: int = 8) -> DiffusionPipe:
    """A freshly initialised (seeded) testbed pipeline: untrained UNet, text encoder and tokenizer."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_tokenizer(words, max_length)
    unet_cfg, text_cfg = testbed_configs(len(tokenizer), max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return DiffusionPipe(TESTBED, unet, text_encoder, tokenizer, testbed_scheduler("leading"), None, 25, 1.5,
                         meta={"words": list(words), "max_length": max_length})


def save_testbed(pipe: DiffusionPipe, path: Path, shape_net: nn.Module, meta: dict) -> None:
    """One safetensors file: the UNet, the text encoder and the evaluator's CNN, configs in the header."""
    from interventions.core.atomic import atomic_save_file

    tensors = {f"{k}": v.detach().contiguous() for k, v in pipe.named_parameters()}
    tensors.update({f"unet_buffer.{k}": v for k, v in pipe.unet.named_buffers()})
    tensors.update({f"shape_net.{k}": v.detach().contiguous() for k, v in shape_net.state_dict().items()})
    header = {"words": pipe.meta["words"], "max_length": pipe.meta["max_length"],
              "scheduler": dict(pipe.scheduler.config), "steps": pipe.steps, "guidance": pipe.guidance, **meta}
    atomic_save_file(tensors, path, metadata={"lesion_testbed": json.dumps(header, default=list)})


def _load_testbed(path: Path) -> DiffusionPipe:
    from safetensors import safe_open

    from interventions.testbeds.shapes import Evaluator, ShapeNet

    if not path.is_file():
        raise ModelNotAvailable(f"`model`: {TESTBED!r} needs {path}; train it with: python -m recipes.train.train_shapes")
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["lesion_testbed"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    pipe = build_testbed(header["words"], max_length=header["max_length"])
    for prefix, module in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=False)
        missing = {k for k, _ in module.named_parameters()} - set(state)
        if missing:
            raise ModelNotAvailable(f"`model`: {path} lacks {sorted(missing)[:3]}...; retrain it")
    net = ShapeNet()
    net.load_state_dict({k[len("shape_net."):]: v for k, v in tensors.items() if k.startswith("shape_net.")})
    pipe.steps, pipe.guidance = header["steps"], header["guidance"]
    pipe.meta.update(header, evaluator=Evaluator(net))
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


# ------------------------------------------------------------------------- the scenes testbed
SCENES_LM = "smollm2-135m"
SCENES_MAX_LENGTH = 32
SCENES_LAYERS = 8


SCENES_CONTEXT = 128


class TextAdapter(nn.Module):
    """What the scenes UNet reads of the frozen language model: each token's residual-stream state,
    standardised by fixed per-feature statistics of the training captions, then a small learned
    per-token map (linear, one residual MLP, LayerNorm) to the UNet's `cross_attention_dim`.

    It stands where the language model's final RMSNorm stood, so the pipe's `encode` returns its
    output. The standardisation matters because a decoder's residual stream has a few features tens
    of times larger than the rest (SmolLM2's reach 28 where the median spread is 0.8), which
    cross-attention keys would otherwise see alone; the learned map plays the part that training the
    text encoder jointly plays in the coloured-shapes testbed (LLM-conditioned diffusion models add
    such a refiner on their frozen LLM). Per token, so the padding after a prompt still changes none
    of its states."""

    def __init__(self, width: int, dim: int = SCENES_CONTEXT):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.proj = nn.Linear(width, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.out = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.proj((h - self.mean) / self.std)
        return self.out(x + self.mlp(x))


def scenes_unet_config(cross_attention_dim: int = SCENES_CONTEXT) -> dict:
    """The scenes testbed's UNet: 24x24 pixels, cross-attention at 12x12 and 6x6 reading the text
    adapter's output (`TextAdapter`)."""
    return dict(sample_size=24, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 96),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8)


def scenes_text_encoder(lm_name: str = SCENES_LM, max_length: int = SCENES_MAX_LENGTH, layers: int = SCENES_LAYERS,
                        context: int = SCENES_CONTEXT):
    """``(text_encoder, tokenizer)``: the language model's first `layers` decoder layers, frozen, with a
    `TextAdapter` (untrained until the recipe trains it or a checkpoint loads it) in place of the final
    norm, so that `last_hidden_state` is what the UNet reads; and its tokenizer, padding to `max_length`
    on the right. Under the causal mask a prompt's states do not depend on the padding after it.
    An intermediate layer, as Stable Diffusion 2 reads CLIP's penultimate one: held-out synonyms of a
    colour sit nearer its training words there than at the top of SmolLM2."""
    from interventions.models.loading import load_model

    lm, tokenizer = load_model(lm_name)
    encoder = lm.model
    if not 1 <= layers <= len(encoder.layers):
        raise SpecError("text_layers", layers, f"1 to {len(encoder.layers)} (the layers of {lm_name})")
    encoder.layers = encoder.layers[:layers]
    encoder.config.num_hidden_layers = layers
    encoder.norm = TextAdapter(encoder.config.hidden_size, context)
    encoder.eval().requires_grad_(False)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_length
    return encoder, tokenizer


SCENES_GUIDANCE = 1.0


def testbed_scheduler(timestep_spacing: str):
    """The testbeds' sampler: DDIM over the cosine schedule they were trained on. The scenes testbed
    places its steps *trailing*: the first sampled step is t = 999, where the schedule leaves no signal.
    With the default (leading) spacing the first step is t = 960, where a noised 24x24 scene still holds
    6% of its image, enough for the UNet to read an object's colour from the mean of the starting noise:
    images then took their colour from the seed, not the prompt (on 200 new scenes, colour right 16% of
    the time with leading steps and guidance 3; 78% with trailing steps and none). Lin et al., "Common
    diffusion noise schedules and sample steps are flawed" (2024), describe the flaw and this fix. The
    coloured-shapes testbed keeps leading steps, with which its shipped numbers were measured.
    Guidance on the scenes testbed is 1.0 (`SCENES_GUIDANCE`, no extrapolation): its unconditional
    branch, trained on 10% empty captions, is too weak for classifier-free guidance, which lowered every
    attribute's accuracy (colour 0.85 at 1.0, 0.57 at 1.5, 0.40 at 2.0 on 60 new scenes)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                         set_alpha_to_one=True, timestep_spacing=timestep_spacing)


def build_scenes_testbed(seed: int = 0, *, text=None, unet_config: dict | None = None) -> DiffusionPipe:
    """A freshly initialised (seeded) scenes UNet under the frozen language model (`text`: a
    ``(text_encoder, tokenizer)`` pair to reuse; default `scenes_text_encoder()`)."""
    from diffusers import UNet2DConditionModel

    encoder, tokenizer = text if text is not None else scenes_text_encoder()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet_config or scenes_unet_config()))
    return DiffusionPipe(SCENES, unet, encoder, tokenizer, testbed_scheduler("trailing"), None, 25, SCENES_GUIDANCE,
                         meta={"lm": SCENES_LM, "max_length": tokenizer.model_max_length, "unet": dict(unet.config),
                               "text_layers": getattr(encoder.config, "num_hidden_layers", None),
                               "text_context": unet.config.cross_attention_dim})


def save_scenes_testbed(pipe: DiffusionPipe, path: Path, shape_net: nn.Module, meta: dict) -> None:
    """One safetensors file: the UNet (float16), the text adapter (float32) and the evaluator's CNN; the
    frozen language model is not stored (it loads from its own wheel)."""
    from interventions.core.atomic import atomic_save_file

    tensors = {f"unet.{k}": v.detach().half().contiguous() for k, v in pipe.unet.state_dict().items()}
    tensors.update({f"shape_net.{k}": v.detach().contiguous() for k, v in shape_net.state_dict().items()})
    tensors.update({f"text_adapter.{k}": v.detach().contiguous() for k, v in pipe.text_encoder.norm.state_dict().items()})
    header = {"lm": pipe.meta["lm"], "max_length": pipe.meta["max_length"], "unet": pipe.meta["unet"],
              "text_layers": pipe.meta["text_layers"], "text_context": pipe.meta["text_context"],
              "scheduler": dict(pipe.scheduler.config), "steps": pipe.steps, "guidance": pipe.guidance, **meta}
    atomic_save_file(tensors, path, metadata={"lesion_testbed": json.dumps(header, default=list)})


def load_scenes_testbed(path: Path) -> DiffusionPipe:
    from safetensors import safe_open

    from interventions.testbeds.scenes import Evaluator, ShapeNet

    if not path.is_file():
        raise ModelNotAvailable(f"`model`: {SCENES!r} needs {path}; train it with: python -m recipes.train.train_scenes")
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["lesion_testbed"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    unet_config = {k: v for k, v in header["unet"].items() if not k.startswith("_")}
    text = scenes_text_encoder(header["lm"], header["max_length"], header["text_layers"], header["text_context"])
    text[0].norm.load_state_dict({k[len("text_adapter."):]: v for k, v in tensors.items()
                                  if k.startswith("text_adapter.")})
    pipe = build_scenes_testbed(text=text, unet_config=unet_config)
    pipe.unet.load_state_dict({k[len("unet."):]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
    net = ShapeNet()
    net.load_state_dict({k[len("shape_net."):]: v for k, v in tensors.items() if k.startswith("shape_net.")})
    pipe.steps, pipe.guidance = header["steps"], header["guidance"]
    pipe.meta.update(header, evaluator=Evaluator(net))
    pipe.unet.eval()
    return pipe
