"""The only module that knows about ranks and launchers."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as torch_dist

from bigrm import console


def init() -> torch.device:
    """Join the process group the launcher set up (gloo on CPU, nccl on GPU); a plain `python` run is world 1."""
    console.quiet()  # before DeepSpeed's first words
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    cuda = torch.cuda.is_available()
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    sys.stdout.write(console.printed_except_built(said.getvalue()))
    if not cuda and world() > 1:
        # DeepSpeed's CPU allreduce maps every rank's shared-memory buffer while it initialises; once every rank is
        # past that, the names can go: the memory lives while mapped and is freed whenever a rank ends, even killed
        barrier()
        _remove_cpu_allreduce_buffers(str(rank()))
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_rank() -> int:
    """The rank the launcher gave this process, whether or not it is in the process group (yet, or still)."""
    return int(os.environ.get("RANK", "0"))


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


# ranks per sequence-parallel group (train.sequence_parallel): consecutive ranks share each packed micro-batch
_SEQUENCE_PARALLEL = 1


def join_sequence_parallel(n: int):
    """Split the world into groups of `n` consecutive ranks, data parallel over the groups; returns the `mpu` that
    deepspeed.initialize takes (DeepSpeed's own Ulysses state: its engine then sums gradients over every rank and
    divides by the groups' count), None for n = 1."""
    global _SEQUENCE_PARALLEL
    if n == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(n)
    _SEQUENCE_PARALLEL = n
    return parallel_state_sp


def sequence_parallel() -> int:
    return _SEQUENCE_PARALLEL


def data_parallel_world() -> int:
    """How many different micro-batches the ranks train on at once: one per sequence-parallel group."""
    return world() // _SEQUENCE_PARALLEL


def data_parallel_rank() -> int:
    return rank() // _SEQUENCE_PARALLEL


def counts() -> bool:
    """Whether this rank's figures count in sums over ranks: one rank per sequence-parallel group, whose ranks all
    hold the same micro-batch's loss and statistics."""
    return rank() % _SEQUENCE_PARALLEL == 0


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; float64 on CPU so counts stay exact whatever the backend."""
    if torch_dist.is_initialized():
        t = t.clone()
        torch_dist.all_reduce(t)
    return t


def all_sum_each(*parts: torch.Tensor) -> list[torch.Tensor]:
    """Several 1-D tensors of one dtype summed over ranks in a single all_reduce."""
    summed = all_sum(torch.cat(parts))
    return list(summed.split([len(p) for p in parts]))


def from_main(fn, *args):
    """Rank 0 runs fn (a decision from the filesystem that every rank must share); its result, or its error, reaches
    every rank: the others neither repeat the work nor wait for a broadcast that a failed rank 0 never sends."""
    result, error = None, None
    if is_main():
        try:
            result = fn(*args)
        except Exception as err:
            error = err
    if torch_dist.is_initialized():
        box = [(result, error)]
        torch_dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def gather_objects(obj) -> list:
    """Every rank's obj, in rank order, on every rank: a collective that every rank must reach."""
    if not torch_dist.is_initialized():
        return [obj]
    out = [None] * world()
    torch_dist.all_gather_object(out, obj)
    return out


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")  # gloo's words


def peer_gone(err: BaseException) -> str | None:
    """gloo's words when a collective failed on this rank because another rank went away (NCCL ranks wait instead,
    until the launcher ends them): that rank's own error, if it could print one, says why."""
    return next((words for words in PEER_GONE if words in str(err)), None) if isinstance(err, RuntimeError) else None


def shutdown(failed: bool = False) -> None:
    """Leave the process group explicitly: left to interpreter exit, DeepSpeed's communication threads can be
    destroyed while still joinable, which aborts the process after the run has finished.

    After a failure the other ranks may be anywhere (inside a collective, or gone), so there is no barrier.
    """
    global _SEQUENCE_PARALLEL
    if torch_dist.is_initialized():
        if not failed:
            torch_dist.barrier()
        torch_dist.destroy_process_group()
    if _SEQUENCE_PARALLEL > 1:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        parallel_state_sp._release_sequence_parallel_groups()
        _SEQUENCE_PARALLEL = 1


def _remove_cpu_allreduce_buffers(ranks: str) -> None:
    """DeepSpeed's CPU shared-memory allreduce leaves each rank's buffer (tens of MB) in /dev/shm, named by the
    rendezvous address and port: every CPU run would otherwise leak one per rank (more when a launcher kills the
    ranks, as deepspeed's does with SIGKILL on SIGTERM or a failed rank) until /dev/shm fills RAM."""
    if torch.cuda.is_available():
        return
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{ranks}"
    for path in Path("/dev/shm").glob(name):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (fills caches, writes files), then the others; if rank 0 fails in it, the others
    are released too (and usually fail the same way) rather than wait for a barrier it never reaches."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
