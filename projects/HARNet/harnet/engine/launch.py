"""Launching multi-process training: Detectron2's ``launch`` (NCCL, GPUs) or a CPU one (gloo).

Detectron2 0.6's :func:`detectron2.engine.launch` asserts CUDA in every worker and uses the
NCCL backend. :func:`launch_cpu` is its CPU counterpart: the same process layout
(``num_processes_per_machine`` workers per machine, global rank = machine_rank *
per-machine + local rank), the gloo backend, and the same per-machine process group in
:mod:`detectron2.utils.comm`, so that ``comm.get_local_rank()`` and everything built on
``comm`` (samplers, evaluators, DDP) behave as under ``launch``.
"""
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm

__all__ = ["launch_cpu", "launch_from_args"]


def launch_cpu(
    main_func,
    num_processes_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    threads_per_process=None,
):
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` CPU processes (gloo).

    Must be called on every machine of the job, like Detectron2's ``launch``.

    Args:
        main_func (callable): picklable (a module-level function); called in every worker.
        num_processes_per_machine (int): worker processes on this machine.
        num_machines (int): machines in the job.
        machine_rank (int): rank of this machine, in [0, num_machines).
        dist_url (str or None): ``tcp://host:port`` of machine 0, ``file://...``, or
            "auto"/None for a free local port (single machine only).
        args (tuple): arguments of ``main_func``.
        timeout (timedelta): timeout of collective operations.
        threads_per_process (int or None): ``torch.set_num_threads`` in every worker;
            default: the visible cores divided evenly among the workers (at least 1).
    """
    world_size = num_machines * num_processes_per_machine
    if num_processes_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"launch_cpu: num_processes_per_machine={num_processes_per_machine} and "
            f"num_machines={num_machines} must be >= 1"
        )
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"launch_cpu: machine_rank={machine_rank} not in [0, {num_machines})")
    if world_size == 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("launch_cpu: dist_url='auto' is only supported on one machine")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if threads_per_process is None:
        threads_per_process = max(1, len(os.sched_getaffinity(0)) // num_processes_per_machine)
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(
            main_func,
            world_size,
            num_processes_per_machine,
            machine_rank,
            dist_url,
            args,
            timeout,
            threads_per_process,
        ),
        daemon=False,
    )


def _cpu_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout,
    threads,
):
    torch.set_num_threads(threads)
    global_rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout),
        )
    except Exception:
        logging.getLogger(__name__).error("Process group URL: {}".format(dist_url))
        raise
    # The per-machine group, created by every process for every machine (new_group is a
    # collective), exactly as Detectron2's launch does.
    assert comm._LOCAL_PROCESS_GROUP is None
    for i in range(world_size // num_per_machine):
        pg = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = pg
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_from_args(main_func, args):
    """Launch ``main_func(args)`` as the command line asks.

    ``args.cpu_procs > 1`` (``--cpu-procs N``): :func:`launch_cpu` with N processes per
    machine; otherwise Detectron2's ``launch`` with ``args.num_gpus`` per machine.
    """
    cpu_procs = getattr(args, "cpu_procs", 0) or 0
    if cpu_procs > 1:
        if args.num_gpus > 1:
            raise ValueError("--cpu-procs and --num-gpus > 1 are exclusive")
        return launch_cpu(
            main_func, cpu_procs, num_machines=args.num_machines,
            machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
        )
    return d2_launch(
        main_func, args.num_gpus, num_machines=args.num_machines,
        machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
    )
