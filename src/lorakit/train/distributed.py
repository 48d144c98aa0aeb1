"""Runtime: the process's place in a torch.distributed job (or a single process), as the trainer needs it.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / MASTER_ADDR…; ``Runtime.from_env`` then
initialises the default process group (gloo on CPU, nccl on CUDA) with a timeout, so that one failing rank
ends the others instead of leaving them waiting forever. Only LoRA parameters require grad, so DDP only
all-reduces those.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 300


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> Runtime:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            timeout = datetime.timedelta(seconds=int(os.environ.get("LORAKIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
            dist.init_process_group(backend=backend, timeout=timeout)
        rank = dist.get_rank()
        device = torch.device("cpu")
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        return cls(rank, dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel over the trainable (LoRA) parameters when world > 1."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=None if self.device.type == "cpu" else [self.device])

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.world > 1 and not last and hasattr(model, "no_sync"):
            with model.no_sync():
                yield
        else:
            yield

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
