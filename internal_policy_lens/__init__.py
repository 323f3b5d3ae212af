"""internal-policy-lens: internal layer and modular policies of LLMs."""

from .config import EntropyConfig, GenerationConfig
from .datasets import DataError, read_records
from .hooks import capture
from .lens import LENSES
from .models import SUPPORTED_ARCHITECTURES, ModelLoadError, PolicyModel, load_model
from .run import EntropyRun, run_entropy
from .sites import MODULES, SITES
from .tables import delta_table, entropy_table, summary_table

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "EntropyConfig",
    "EntropyRun",
    "GenerationConfig",
    "LENSES",
    "MODULES",
    "SITES",
    "SUPPORTED_ARCHITECTURES",
    "ModelLoadError",
    "PolicyModel",
    "capture",
    "delta_table",
    "entropy_table",
    "load_model",
    "read_records",
    "run_entropy",
    "summary_table",
]
