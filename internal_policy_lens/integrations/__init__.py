"""Bridges to distributed engines (optional extras): ``integrations.trl`` needs ``[trl]``."""
