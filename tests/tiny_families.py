"""Tiny random-weight SDXL, SD3 and Flux models in their diffusers folder layouts, built by the tests.

Same classes, subfolders and config keys as the real checkpoints (stable-diffusion-xl-base-1.0,
stable-diffusion-3-medium-diffusers, FLUX.1-dev / FLUX.1-schnell), only the dimensions shrunk, so the service
loads them through the code path the real ones take. Every CLIP slot holds the real CLIP BPE tokenizer (49408 ids,
context 77; its embedding tables are most of each folder: Flux ~10 MB, SDXL and SD3 ~20 MB), every T5 slot a small
Unigram tokenizer trained here with T5's special tokens. All VAEs have 2 blocks (vae_scale_factor 2): 32×32 pixels
are 16×16 latents.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
from transformers import T5Tokenizer as T5TokenizerFast  # transformers 5: one class, mypy can't see the alias

from tests.tiny_models import CORPUS
from tests.tokenizers import clip_tokenizer

# The two CLIP text towers, shrunk: CLIP ViT-L/14 (768 wide, quick_gelu) and OpenCLIP ViT-bigG (1280, gelu).
# Different widths on purpose, so mixing up the towers shows as a shape error. The token ids are the ones the
# real configs carry (bos 0, eos 2, pad 1): eos_token_id 2 makes CLIP pool at the highest id, the first
# <|endoftext|>, as in every SD/SDXL/SD3/Flux checkpoint.
CLIP_L: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "projection_dim": 32,
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
}
CLIP_G: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 192,
    "projection_dim": 48,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
}
# T5 v1.1 XXL's encoder (d_model 4096, gated-gelu), shrunk. SD3 pads the concatenated CLIP states
# (32 + 48 = 80) up to this width, so it must be wider: 96.
T5_D_MODEL = 96
T5_MAX_TOKENS = 512  # the T5 tokenizers' model_max_length in SD3 and Flux
T5_CORPUS = [
    *CORPUS,
    "a pair of brown leather boots",
    "close-up of a silver watch on a black background",
    "product photo of a red dress on a white background",
    "a blue ceramic vase on a wooden shelf",
    "a grey wool sweater, flat lay",
    "a glass bottle of olive oil on a kitchen table",
    "product shot of wireless headphones on grey, 4k",
]

SDXL_SCHEDULER: dict[str, Any] = {  # stable-diffusion-xl-base-1.0's scheduler_config.json, PNDM leftovers included
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
FLUX_DEV_SCHEDULER: dict[str, Any] = {  # FLUX.1-dev: the shift follows the image's token count
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL_SCHEDULER: dict[str, Any] = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def _t5_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )


def t5_tokenizer() -> T5TokenizerFast:
    """T5's shape (<pad> 0, </s> 1, <unk> 2, </s> appended, 100 sentinels) on a Unigram model trained on captions.

    The backend is the one ``T5Tokenizer`` rebuilds on load (Metaspace; no normalizer, as T5's precompiled
    SentencePiece charsmap can't be made offline), so save/load keeps the ids. Printable ASCII is in the alphabet,
    anything else is <unk>. Trained afresh on each call (a few ms), with the same ids in every process.
    """
    specials = ["<pad>", "</s>", "<unk>"]
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=specials,
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = _t5_pre_tokenizer()
    trained.train_from_iterator(T5_CORPUS, trainer)
    # The trainer's scores vary in their last bits from run to run, and the characters it pruned come back scored
    # min_score + 0.0001·k with k in hash order: either moves ids or flips segmentations. So those characters get one
    # score, every score is rounded, and the pieces are sorted.
    raw = {p: score for p, score in json.loads(trained.to_str())["model"]["vocab"] if p not in specials}
    low = min(raw.values())
    steps = {p: (score - low) / 1e-4 for p, score in raw.items()}
    pruned = {p for p, k in steps.items() if k < len(raw) and abs(k - round(k)) < 1e-3}
    scores = {p: round(low if p in pruned else score, 4) for p, score in raw.items()}
    pieces = sorted(scores, key=lambda p: (-scores[p], p))
    tok = Tokenizer(models.Unigram([(p, 0.0) for p in specials] + [(p, scores[p]) for p in pieces], unk_id=2))
    tok.pre_tokenizer = _t5_pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=100,
        model_max_length=T5_MAX_TOKENS,
    )


@functools.cache
def _clip_source() -> Path:
    """A folder holding clip_tokenizer's vocab.json and merges.txt, made once a process: clip_tokenizer caches one
    tokenizer per folder (~9 MB each), so building every slot from its own folder would pile them up."""
    folder = Path(tempfile.mkdtemp(prefix="tiny-clip-"))
    atexit.register(shutil.rmtree, folder, True)
    clip_tokenizer(folder)
    return folder


def _clip(
    folder: Path, tower: dict[str, Any], *, projection: bool, pad_token: str | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Save the real CLIP tokenizer to ``folder`` as the checkpoints ship it and return a tiny text tower.

    Layout: vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json (as in the SDXL/SD3/Flux repos;
    it also loads ~6x faster, 0.06 s against 0.4 s). ``pad_token="!"``: the OpenCLIP-G tokenizers of SDXL and SD3
    pad with "!" (id 0) and make it special, so "!!" reads as two pads, as diffusers does with the real ones.
    """
    source = _clip_source()
    tokenizer = clip_tokenizer(source)
    if pad_token is not None:  # a copy: clip_tokenizer's result is cached and shared
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_special_tokens({"pad_token": pad_token})
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, folder / name)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **tower,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5_encoder(vocab: int) -> T5EncoderModel:
    """T5 v1.1's encoder, shrunk; the vocabulary rounded up to a multiple of 128 as 32100 pieces → 32128 rows."""
    return T5EncoderModel(
        T5Config(
            vocab_size=-(-vocab // 128) * 128,
            d_model=T5_D_MODEL,
            d_kv=16,
            d_ff=256,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=6,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None) -> AutoencoderKL:
    """A 2-block AutoencoderKL (vae_scale_factor 2); the 16-channel ones drop the quant convs as SD3's and Flux's."""
    flow = latent_channels == 16
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        force_upcast=True,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    )


def _write(folder: Path, components: dict[str, Any], scheduler: dict[str, Any], index: dict[str, Any]) -> None:
    """Save each remaining component to its subfolder (weights as safetensors), the scheduler, model_index.json."""
    for name, component in components.items():
        if name.startswith("tokenizer"):
            component.save_pretrained(folder / name)
        else:
            component.save_pretrained(folder / name, safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_defaults(folder: Path, defaults: dict[str, Any] | None) -> Path:
    if defaults:
        (folder / "imagegen.json").write_text(json.dumps(defaults))
    return folder


def build_tiny_sdxl(
    folder: Path,
    *,
    seed: int = 0,
    scheduler: dict[str, Any] | None = None,
    force_zeros_for_empty_prompt: bool = True,
    defaults: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight StableDiffusionXLPipeline folder (two CLIP towers, text_time UNet) and return it.

    32×32 px (16×16 latents) is the default size; sizes must be multiples of 8, the pipeline's fixed check (the
    UNet alone would take multiples of 4).
    """
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    text_encoder = _clip(folder / "tokenizer", CLIP_L, projection=False)
    text_encoder_2 = _clip(folder / "tokenizer_2", CLIP_G, projection=True, pad_token="!")
    time_dim = 8  # SDXL: 256 per micro-condition; 6 of them (original size, crop, target size) + pooled text
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=(1, 2),  # diffusers' name for heads per level (16 channels each); SDXL's (5, 10, 20)
        transformer_layers_per_block=(1, 2),  # SDXL's (1, 2, 10)
        cross_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + CLIP_G["projection_dim"],
        norm_num_groups=8,
    )
    vae = _vae(4, scaling_factor=0.13025, shift_factor=None)
    scheduler = scheduler or SDXL_SCHEDULER
    components = {
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "unet": unet,
        "vae": vae,
    }
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write(folder, components, scheduler, index)
    return _write_defaults(folder, defaults)


def build_tiny_sd3(
    folder: Path,
    *,
    seed: int = 0,
    with_t5: bool = True,
    shift: float = 3.0,
    defaults: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight StableDiffusion3Pipeline folder (CLIP-L, CLIP-G, T5, MMDiT) and return it.

    ``with_t5=False`` writes the T5 slot as ``[null, null]``, as ``save_pretrained`` does for a pipeline loaded with
    ``text_encoder_3=None, tokenizer_3=None`` (the T5 half of the prompt embedding is then zeros); diffusers loads
    such a folder only when those two are passed as None again. 32×32 px is the default; sizes must be multiples
    of 4 (vae 2 × patch 2), at most 128 px (pos_embed_max_size).
    """
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    text_encoder = _clip(folder / "tokenizer", CLIP_L, projection=True)
    text_encoder_2 = _clip(folder / "tokenizer_2", CLIP_G, projection=True, pad_token="!")
    heads, head_dim = 2, 16
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=T5_D_MODEL,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
        pos_embed_max_size=32,  # in patches: latents up to 64, pixels up to 128 (SD3's 192)
    )
    vae = _vae(16, scaling_factor=1.5305, shift_factor=0.0609)
    components: dict[str, Any] = {
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "transformer": transformer,
        "vae": vae,
    }
    t5_slot: dict[str, list[str | None]] = {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    if with_t5:
        tokenizer_3 = t5_tokenizer()
        components |= {"text_encoder_3": _t5_encoder(len(tokenizer_3)), "tokenizer_3": tokenizer_3}
        t5_slot = {
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
        }
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        **t5_slot,
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write(folder, components, scheduler, index)
    return _write_defaults(folder, defaults)


def build_tiny_flux(
    folder: Path,
    *,
    seed: int = 0,
    guidance_embeds: bool = True,
    defaults: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight FluxPipeline folder and return it: FLUX.1-dev's shape (guidance embedding, dynamic
    shift) by default, FLUX.1-schnell's (no guidance embedding, shift 1) with ``guidance_embeds=False``.

    Sizes must be multiples of 4 (vae 2 × 2×2 packing); FluxPipeline's default is 256 px (its sample size is
    hard-coded, 128 × vae_scale_factor), so pass height/width.
    """
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    text_encoder = _clip(folder / "tokenizer", CLIP_L, projection=False)
    tokenizer_2 = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels × 2×2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_L["hidden_size"],  # Flux takes CLIP-L's pooler output, not a projection
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # FLUX.1's (16, 56, 56): sums to the head dim
    )
    vae = _vae(16, scaling_factor=0.3611, shift_factor=0.1159)
    components = {
        "text_encoder": text_encoder,
        "text_encoder_2": _t5_encoder(len(tokenizer_2)),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "vae": vae,
    }
    scheduler = FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER
    index = {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write(folder, components, scheduler, index)
    return _write_defaults(folder, defaults)


def build_tiny_sdxl_inpainting(folder: Path, *, seed: int = 0) -> Path:
    """A tiny SDXL inpainting checkpoint (``StableDiffusionXLInpaintPipeline``, as stable-diffusion-xl-1.0-
    inpainting-0.1): the tiny SDXL folder with a 9-channel UNet of the same config, random weights."""
    build_tiny_sdxl(folder, seed=seed)
    config = dict(UNet2DConditionModel.load_config(folder / "unet"))
    torch.manual_seed(seed + 1000)
    UNet2DConditionModel.from_config({**config, "in_channels": 9}).save_pretrained(
        folder / "unet", safe_serialization=True
    )
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLInpaintPipeline"}))
    return folder
