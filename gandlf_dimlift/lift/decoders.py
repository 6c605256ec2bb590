"""Lifted replacements for smp decoder blocks that resample with 2D ``F.interpolate`` calls."""

from __future__ import annotations
