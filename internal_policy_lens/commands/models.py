"""The model commands: models (what is bundled and supported) and make-tiny."""

from __future__ import annotations

from pathlib import Path


def listing() -> str:
    """The bundled models with their folders, then each family with its tiny architecture."""
    from ..bundled import BUNDLED_MODELS, bundled_model_path
    from ..model.families import FAMILIES

    lines = ["bundled models:"]
    lines += [f"  {name}\t{bundled_model_path(name)}" for name in BUNDLED_MODELS]
    lines.append("supported families (transformers class, ipl make-tiny --arch):")
    for family in FAMILIES:
        lines.append(f"  {family.name}\t{family.hf_class}\t{family.arch}")
        lines.append(f"      attn_out: {family.attn_out}; mlp_out: {family.mlp_out}")
        lines.append(f"      lens {family.lens}")
        reason = family.eager_attention
        lines.append(f"      attention: eager ({reason})" if reason else "      attention: sdpa")
    return "\n".join(lines)


def make_tiny(arch: str, out: Path, seed: int, layers: int) -> str:
    """Write a tiny random model of ``arch``; say where."""
    from ..model.tiny import make_tiny_model

    folder = make_tiny_model(arch, out, seed=seed, n_layers=layers)
    return f"wrote a random {arch} model with {layers} layers to {folder}/"
