"""Tiny random MUSE models made by diffusers' and transformers' own classes, written as `save_pretrained` writes
them, for the tests of the diffusers path (nothing can be downloaded here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from softdimo import shapes

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEXT_LENGTH = 32  # CLIP ids per prompt (77 in real CLIP models)


def write_clip_tokenizer(folder: Path) -> Path:
    """A byte-level BPE vocabulary of single letters plus merges that spell the Shapes words, as vocab.json and
    merges.txt: any text of letters tokenizes, a Shapes prompt in a few ids per word."""
    vocab: dict[str, int] = {}
    merges: list[str] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    add("<|startoftext|>")
    add("<|endoftext|>")
    for c in LETTERS:
        add(c)
        add(c + "</w>")
    for word in shapes.VOCABULARY:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            add(pieces[0])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": TEXT_LENGTH, "tokenizer_class": "CLIPTokenizer"})
    )
    return folder


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder))


def tiny_components(folder: Path, seed: int = 0) -> dict:
    """The five parts AmusedPipeline takes: 8x8 tokens over 32 codes, 16x16 images, a 2-layer CLIP text encoder."""
    from diffusers import AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer(folder / "clip-tokenizer-source")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TEXT_LENGTH,
            projection_dim=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    transformer = UVit2DModel(
        hidden_size=16,
        use_bias=False,
        cond_embed_dim=8,
        micro_cond_encode_dim=2,
        micro_cond_embed_dim=10,
        encoder_hidden_size=16,
        vocab_size=33,
        codebook_size=32,
        in_channels=8,
        block_out_channels=16,
        num_res_blocks=1,
        downsample=True,
        upsample=True,
        block_num_heads=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        sample_size=8,
    )
    vqvae = VQModel(
        act_fn="silu",
        block_out_channels=[32, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        num_vq_embeddings=32,
        out_channels=3,
        sample_size=16,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        norm_type="spatial",
    )
    with torch.no_grad():  # random weights decode to a flat grey; spread the codes so images differ with their tokens
        vqvae.quantize.embedding.weight.normal_(0, 1)
    return {
        "vqvae": vqvae,
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "transformer": transformer,
        "scheduler": AmusedScheduler(mask_token_id=32),
    }


def amused_pipeline(components: dict):
    from diffusers import AmusedPipeline

    pipe = AmusedPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_teacher(folder: Path, seed: int = 0, name: str = "tiny-amused", steps: int = 4) -> Path:
    """A tiny aMUSEd saved by AmusedPipeline.save_pretrained, made a softdimo teacher bundle in place."""
    from softdimo.muse import MuseSamplerSettings, write_teacher_bundle

    amused_pipeline(tiny_components(folder.parent / f"{folder.name}-parts", seed)).save_pretrained(folder)
    return write_teacher_bundle(folder, name=name, sampler=MuseSamplerSettings(steps=steps))


def write_clip_reward(folder: Path, seed: int = 0, name: str = "tiny-clip-vit") -> Path:
    """A tiny random CLIPModel with its tokenizer and image processor, as a softdimo reward bundle."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from softdimo.clip_reward import write_clip_bundle

    source = folder.parent / f"{folder.name}-source"
    tokenizer = clip_tokenizer(source)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": TEXT_LENGTH,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(source)
    return write_clip_bundle(folder, source=source, name=name)
