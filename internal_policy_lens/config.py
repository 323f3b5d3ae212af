"""Configuration dataclasses, one per command; the only copy of the defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

DEFAULT_DATA = "aime_2024.jsonl"


def bundled_data(name: str = DEFAULT_DATA) -> Path:
    """Path of a data file shipped with the package."""
    return Path(str(resources.files("internal_policy_lens") / "data" / name))


@dataclass
class GenerationConfig:
    """How responses are generated for records that have none."""

    max_new_tokens: int = 256
    """Longest response, in tokens."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 keeps the whole distribution)."""
    samples_per_prompt: int = 1
    """Responses per prompt; with more than one, sample ids become '<id>:<k>'."""
    seed: int = 0
    """Seed of the sampler; each generation batch is seeded from it and its index."""
    batch_size: int = 8
    """Prompts per generation batch."""


@dataclass
class EntropyConfig:
    """One ``ipl entropy`` run: which model, which data, which policies, where to write."""

    model: str
    """Hub name or local folder of the model."""
    data: str = field(default_factory=lambda: str(bundled_data()))
    """JSONL, Parquet or CSV file of records (see the README for the layouts)."""
    out: str = "runs/entropy"
    """Run folder."""
    lens: str = "raw"
    """``raw`` (the paper's definition, no final norm) or ``norm`` (logit lens)."""
    sites: list[str] | None = None
    """Sites to analyse (default: all eight)."""
    layers: str | None = None
    """Layers, e.g. '0,3,5-7' (default: all)."""
    dtype: str = "auto"
    """Model dtype: auto, float32, bfloat16, float16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    revision: str | None = None
    """Hub revision of the model."""
    batch_size: int = 4
    """Sequences per forward pass of the analysis."""
    chunk_tokens: int = 1024
    """Rows whose logits are held at once."""
    max_samples: int | None = None
    """Analyse only the first N records."""
    max_length: int | None = None
    """Truncate sequences to this many tokens (default: the model's context length)."""
    response_only: bool = True
    """Keep only positions that predict response tokens (the paper averages over those)."""
    extras: bool = False
    """Add next-token log-prob and rank, KL to the final policy and top-1 agreement."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Settings for records without a response."""
    overwrite: bool = False
    """Start over in a run folder that holds a run with a different configuration."""

    def identity(self) -> dict:
        """The fields that define the results; a resumed run must match them."""
        out = asdict(self)
        out.pop("overwrite")
        out.pop("out")
        return out
