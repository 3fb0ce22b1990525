"""Compatibility re-exports: the upload checks moved into :mod:`strategies.screen`.

This module only keeps ``from strategies.validation import ...`` working for code written
against the old layout; new code imports from :mod:`strategies.screen`.
"""

from strategies.screen import Template, UpdateRejected, absurd_norms, check_state, decode_state, state_norm, template_of

__all__ = ["Template", "UpdateRejected", "absurd_norms", "check_state", "decode_state", "state_norm",
           "template_of"]
