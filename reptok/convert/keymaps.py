"""Official state-dict names: our key -> the authors' key, for the networks whose names differ.

With the component adapters beside it (``layout.py``: the prefixes; ``encoder.py``,
``generator.py``, ``vae.py``) the only place that spells official key names
(official-checkpoint-spec.md tables 3.8 and 6.1):

- the decoder: ``decoder_key_map(depth, mapping_depth)``, one-to-one renames (below);
- the generator: our keys are the official ones minus ``_orig_mod.`` (``generator.py``); its
  label table keeps the official name ``label_embedder.*`` through ``TokenGenerator``'s
  state-dict hooks;
- the encoder: timm's ViT names (``encoder.py``); the VAE: diffusers' names, legacy attention
  names mapped in ``vae.py``.
"""

from __future__ import annotations


def decoder_key_map(depth: int, mapping_depth: int = 2) -> dict[str, str]:
    """Our state-dict key -> the official key, relative to the ``RepTokLatentRF2D`` root.

    One-to-one and shape-preserving (spec table 3.8): converting is renaming. In the released
    Lightning checkpoint the official keys sit under ``first_stage.decoder.decoder.``.
    """
    m: dict[str, str] = {}
    for i in range(depth):
        ours, off = f"blocks.{i}.", f"backbone.mid_level.{i}."
        m[ours + "attn.norm.linear.weight"] = off + "self_attn.norm.linear.weight"
        m[ours + "attn.qkv_proj.weight"] = off + "self_attn.qkv_proj.weight"
        m[ours + "attn.scale"] = off + "self_attn.scale"
        m[ours + "attn.rope.freqs"] = off + "self_attn.pos_emb.freqs"
        m[ours + "attn.out_proj.weight"] = off + "self_attn.out_proj.weight"
        m[ours + "ff.norm.linear.weight"] = off + "ff.norm.linear.weight"
        m[ours + "ff.up_proj.weight"] = off + "ff.up_proj.weight"
        m[ours + "ff.down_proj.weight"] = off + "ff.down_proj.weight"
    m["patch_in.weight"] = "backbone.mid_merge.pre_proj.proj.weight"
    m["in_proj.weight"] = "backbone.mid_merge.proj.weight"
    m["out_norm.scale"] = "backbone.mid_split.post_proj.norm.scale"
    m["patch_out.weight"] = "backbone.mid_split.post_proj.proj.weight"
    m["time_emb.weight"] = "time_emb.weight"
    m["time_in_proj.weight"] = "time_in_proj.weight"
    m["mapping.in_norm.scale"] = "mapping.in_norm.scale"
    m["mapping.out_norm.scale"] = "mapping.out_norm.scale"
    for j in range(mapping_depth):
        for name in ("norm.scale", "up_proj.weight", "down_proj.weight"):
            m[f"mapping.blocks.{j}.{name}"] = f"mapping.blocks.{j}.{name}"
    m["token_proj.temp_pos_embed"] = "encoder.dino.temp_pos_embed"
    m["token_proj.new_reg"] = "encoder.dino.new_reg"
    for name in ("fc.weight", "fc.bias", "ln.weight", "ln.bias"):
        m[f"token_proj.{name}"] = f"encoder.dino.backbone.{name}"
    return m
