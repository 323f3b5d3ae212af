"""TRL integration: BuPO on GRPOTrainer and training probes for any GRPOTrainer.

``trainer`` holds the BuPO trainer, ``run`` the ``--engine trl`` runner, ``callback`` the
probes. Needs the ``[trl]`` extra. :class:`BupoGRPOTrainer`, :func:`train_bupo_trl` and
:class:`InternalPolicyCallback` are importable from here.
"""

from .callback import InternalPolicyCallback
from .run import train_bupo_trl
from .trainer import BupoGRPOTrainer

__all__ = ["BupoGRPOTrainer", "InternalPolicyCallback", "train_bupo_trl"]
