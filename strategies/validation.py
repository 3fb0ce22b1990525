"""Compatibility re-exports: the upload checks moved into :mod:`clair_flower.strategies.screen`.

This module only keeps ``from clair_flower.strategies.validation import ...`` working for code written
against the old layout; new code imports from :mod:`clair_flower.strategies.screen`.
"""

from clair_flower.strategies.screen import Template, UpdateRejected, absurd_norms, check_state, decode_state, state_norm, template_of

__all__ = ["Template", "UpdateRejected", "absurd_norms", "check_state", "decode_state", "state_norm",
           "template_of"]
