"""Bridges to other training frameworks (TRL)."""
