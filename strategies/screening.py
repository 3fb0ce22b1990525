"""Compatibility re-exports: the former home of the reply screen.

The screen now lives in three modules, one concept each: :mod:`clair_flower.strategies.uploads` (what the
screen hands on: :class:`Upload`, :class:`ScreenReport`), :mod:`clair_flower.strategies.screen` (the checks:
:class:`ReplyScreen`) and :mod:`clair_flower.strategies.screened` (any Flower strategy behind the screen:
:class:`ScreenedStrategy`). This module only keeps ``from clair_flower.strategies.screening import ...``
working for code written against the old layout; new code imports from those modules.
"""

from clair_flower.strategies.screen import ReplyScreen
from clair_flower.strategies.screened import STATELESS_FLOWER_STRATEGIES, ScreenedStrategy
from clair_flower.strategies.uploads import ScreenReport, Upload, common_scalar_metrics

__all__ = ["STATELESS_FLOWER_STRATEGIES", "ReplyScreen", "ScreenReport", "ScreenedStrategy", "Upload",
           "common_scalar_metrics"]
