"""Library messages that say nothing a user can act on, silenced in one place, before the libraries print them.

Each is named by its logger and the start of its text, so nothing else from those loggers is lost. What they meant,
where it matters, bigrm says itself: the banner names the device, "on the CPU (no GPU found)" included.
"""

from __future__ import annotations

import logging
import warnings

QUIET = {
    "DeepSpeed": (
        # the banner says it, once rather than once per process
        "Setting accelerator to CPU",
        # DeepSpeed's engine reads the schedule's lr while setting up, before the first step: always, by design
        "Attempting to get learning rate from scheduler before it has started",
    ),
    # an optional faster CPU kernel for 4-bit inference, named at import whether or not anything is quantised
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}
BUILT = "DeepSpeed deepspeed.ops.comm."  # DeepSpeed's print (not a log) once its CPU allreduce op is loaded


class _Drop(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet() -> None:
    """Install the filters (once however often called)."""
    # DeepSpeed still calls collectives that torch marks deprecated, once per bucket: noise, not news
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    for name, starts in QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(starts))


def printed_except_built(text: str) -> str:
    """`text` printed while DeepSpeed set up its process group, without its note that its op is built."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(BUILT))
