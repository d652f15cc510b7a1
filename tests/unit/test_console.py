"""Library messages a user cannot act on are dropped by their logger and first words, nothing else."""

from __future__ import annotations

import logging

import pytest

from bigrm import console


@pytest.mark.parametrize(("name", "said"), [(n, s) for n, starts in console.QUIET.items() for s in starts])
def test_only_the_named_messages_are_dropped(name, said):
    console.quiet()
    console.quiet()  # once however often
    logger = logging.getLogger(name)
    assert sum(isinstance(f, console._Drop) for f in logger.filters) == 1
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # this logger's own records, whatever handlers other tests left on the root
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        logger.warning(f"{said} and the rest of it")
        logger.warning(f"something else: {said}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in seen] == [f"something else: {said}"]


def test_deepspeeds_op_note_is_dropped_from_what_it_prints():
    printed = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\nother\n"
    assert console.printed_except_built(printed) == "other\n"
