"""Visibility by positions and segments: the one rule every attention path uses.

A leaf module (imports jax only) so that ``pallas_kernels`` may use it.
"""

from __future__ import annotations

#: Segment id of padding rows and empty cache slots: invisible to every query, sees nothing.
PAD_SEGMENT = -1
