"""Bypass: takes its host module out of the forward pass while the adapter runs."""

from __future__ import annotations

from ..layer import AdapterModule, InitMode


class Bypass(AdapterModule):
    """The host returns its first input unchanged instead of calling its base module, while this adapter runs.

    For a base module that a method's own recipe does not have: Point-PEFT's blocks have no drop-path on the
    attention branch, so it bypasses the backbone's. Disabling or removing the adapter restores the base module.
    No parameters; nothing to merge.

    Shapes:
        - input / output: any, unchanged
    """

    skips_base = True

    def reset_adapter(self, init_weights: InitMode = True) -> None:
        """Nothing to initialise."""
