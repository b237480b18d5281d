"""Where models run: the one default device, and CPU threads for code whose main job is running a model.

Loading a scorer changes nothing process-wide; whoever runs scoring (or training) as its main job chooses the thread
count, for the duration of that job, with `torch_threads`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def default_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device) -> bool:
    """Whether `device` computes bfloat16 natively (a GPU from Ampere on). torch's is_bf16_supported() also says yes
    for a V100 or a T4, which only emulate it, slower than float32."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False) and torch.cuda.get_device_capability(device)[0] >= 8


def default_num_threads() -> int:
    """The CPUs this process may run on (its affinity mask under a scheduler), not every core of the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def torch_threads(num_threads: int | None = None) -> Iterator[int]:
    """torch's intra-op threads at `num_threads` (None: `default_num_threads()`) inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    wanted = num_threads or default_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)


def release_device_memory() -> None:
    """What PyTorch's allocator keeps reserved on the GPU for this process, given back once a model is dropped: the
    GPU's next user (a vLLM server, the next task's model in a process that moved to another GPU) gets it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
