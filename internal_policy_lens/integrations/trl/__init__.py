"""BuPO on TRL's GRPOTrainer: the trainer (``trainer``) and the ``--engine trl`` runner (``run``).

Needs the ``[trl]`` extra. :class:`BupoGRPOTrainer` and :func:`train_bupo_trl` are importable
from here.
"""

from .run import train_bupo_trl
from .trainer import BupoGRPOTrainer

__all__ = ["BupoGRPOTrainer", "train_bupo_trl"]
