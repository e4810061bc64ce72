"""Known third-party output while a diffusers teacher loads, silenced where it is emitted so that a run prints its
own progress and results; each item says why it is noise here."""

from __future__ import annotations

import logging
from contextlib import contextmanager


class _TorchvisionFallback(logging.Filter):
    """transformers (>= 5) notes once per process that an image processor falls back to its PIL twin without
    torchvision. Diffusers' pipeline modules import CLIP / SigLIP image processors that tdm never loads (no safety
    checker, no IP-adapter), and torchvision is not installed beside the CPU torch on purpose: nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_FALLBACK = _TorchvisionFallback()
logging.getLogger("transformers.utils.import_utils").addFilter(_FALLBACK)  # the logger that emits it; added once


@contextmanager
def quiet_loading():
    """diffusers' and transformers' progress bars off while weights load ('Loading pipeline components...', one
    'Loading weights' bar per text encoder, checkpoint shards): tdm's own bar shows progress. Restored after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, on in was:
        if on:
            module.disable_progress_bar()
    try:
        yield
    finally:
        for module, on in was:
            if on:
                module.enable_progress_bar()
