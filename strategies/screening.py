"""Compatibility re-exports: the former home of the reply screen.

The screen now lives in three modules, one concept each: :mod:`strategies.uploads` (what the
screen hands on: :class:`Upload`, :class:`ScreenReport`), :mod:`strategies.screen` (the checks:
:class:`ReplyScreen`) and :mod:`strategies.screened` (any Flower strategy behind the screen:
:class:`ScreenedStrategy`). This module only keeps ``from strategies.screening import ...``
working for code written against the old layout; new code imports from those modules.
"""

from strategies.screen import ReplyScreen
from strategies.screened import STATELESS_FLOWER_STRATEGIES, ScreenedStrategy
from strategies.uploads import ScreenReport, Upload, common_scalar_metrics

__all__ = ["STATELESS_FLOWER_STRATEGIES", "ReplyScreen", "ScreenReport", "ScreenedStrategy", "Upload",
           "common_scalar_metrics"]
