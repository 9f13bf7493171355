"""run_distributed_test: run a function in several CPU processes (gloo), laid out as torchrun would lay them out."""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world, local_world, port, results, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank % local_world), LOCAL_WORLD_SIZE=str(local_world),
                      GROUP_RANK=str(rank // local_world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # forked/spawned workers otherwise fight over the two cores
    try:
        # pickled here, by value: torch's queue would share tensors through fds that die with this process
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed_test(fn, world_size: int, *args, local_world_size: int | None = None, timeout: float = 300.0):
    """Run ``fn(*args)`` on ``world_size`` ranks (``local_world_size`` per emulated node); return results by rank.

    ``fn`` initialises the process group itself (from the environment, as under torchrun) and must be importable.
    The free port is picked before the ranks bind it, so another process can take it in between: only that failure
    (address in use) is retried, once, on a fresh port.
    """
    try:
        return _run(fn, world_size, args, local_world_size, timeout)
    except AssertionError as e:
        if "address already in use" not in str(e).lower() and "eaddrinuse" not in str(e).lower():
            raise
        return _run(fn, world_size, args, local_world_size, timeout)


def _run(fn, world_size: int, args: tuple, local_world_size: int | None, timeout: float):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    local = local_world_size or world_size
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, local, port, results, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
            if errors:
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout}s waiting for {world_size - len(out)} rank(s)")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed test failed\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]
