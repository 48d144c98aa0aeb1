"""Runtime: the process's place in a torch.distributed job (or a single process), as the trainer needs it.

Launch with ``torchrun --nproc-per-node N -m lorakit train …`` (or ``accelerate launch``): the launcher sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and ``Runtime.from_env`` initialises the default
process group — gloo on CPU, nccl on CUDA — with a timeout (``LORAKIT_DIST_TIMEOUT`` seconds, default 300),
so that a rank that stops answering ends the others instead of leaving them waiting forever.

How the trainer uses it (see ``train/loop.py``):

- Data: optimizer step s consumes positions [s·G, (s+1)·G) of one seeded order, G = batch × accum × world;
  ``shard_rows`` gives rank r rows r·B … r·B+B-1 of each of the step's ``accum`` slabs of B·world rows, so
  the ranks together see exactly the single-process step's rows, each once.
- ``wrap``: DistributedDataParallel — only parameters that require grad (the LoRA factors) are bucketed and
  all-reduced; the frozen base is neither broadcast nor synchronised (every rank loads the same files). With
  ``fsdp=True``: FSDP2 ``fully_shard`` on every transformer block and on the root, frozen and trainable
  parameters sharded together (each DTensor keeps its ``requires_grad``).
- Evaluation runs on every rank in lockstep (required under FSDP, where a forward is a collective; under DDP
  it keeps the other ranks busy instead of idling into the timeout), and only rank 0 logs it.
- At the end ``check_agreement`` all-gathers a digest of each rank's adapter and raises if any differs,
  ``consolidate`` gathers an FSDP model into one plain copy on rank 0, and rank 0 alone saves and reports.
- ``guard`` prefixes an error's message with the rank that raised it, so the job's output names the rank.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from ..model import PeftModel

DEFAULT_TIMEOUT_S = 300
TIMEOUT_ENV = "LORAKIT_DIST_TIMEOUT"
FAIL_RANK_ENV = "LORAKIT_FAIL_ON_RANK"
FAIL_STEP_ENV = "LORAKIT_FAIL_AT_STEP"


def shard_rows(indices: list[int], batch_size: int, grad_accum: int, rank: int, world: int) -> list[list[int]]:
    """This rank's rows of one optimizer step, one list per micro-batch.

    ``indices`` (length G = batch_size · grad_accum · world) are the step's example indices; micro-batch k
    is slab k (``batch_size · world`` rows) and rank r takes rows r·B … r·B+B-1 of it. Over all ranks the
    k-th micro-batches are exactly slab k, so the union over ranks is the single-process step.
    """
    slab = batch_size * world
    return [indices[k * slab + rank * batch_size: k * slab + (rank + 1) * batch_size] for k in range(grad_accum)]


def adapter_digest(model: PeftModel) -> str:
    """sha256 over the adapters as they would be saved (file keys, dtypes, shapes, bytes), for comparisons."""
    from ..io import get_adapter_state_dict

    digest = hashlib.sha256()
    for name in sorted(model.peft_config):
        for key, tensor in sorted(get_adapter_state_dict(model, name).items()):
            digest.update(f"{name}/{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16
                          else tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _timeout_seconds() -> int:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    if not raw.isdigit() or int(raw) <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is invalid: use a positive number of seconds, e.g. 300.")
    return int(raw)


@dataclass
class Runtime:
    """Rank, world size and device of this process, and the collectives the trainer needs."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    sharded: bool = False
    """True once ``wrap(fsdp=True)`` sharded the model (FSDP2) in a multi-process job."""
    _skeleton: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, device: str = "cpu") -> Runtime:
        """A single-process runtime, or — under torchrun/accelerate (WORLD_SIZE > 1) — join the job.

        ``device`` is ``--device`` (see ``train/device.py``); under torchrun ``auto``/``cuda`` give every
        rank ``cuda:LOCAL_RANK`` and the job uses nccl, a CPU job gloo.

        Raises:
            ValueError: LORAKIT_DIST_TIMEOUT is not a positive integer, or ``device`` is not available.
        """
        from .device import local_rank, resolve_device

        resolved = resolve_device(device, local_rank())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=resolved)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=_timeout_seconds())
            dist.init_process_group(backend=backend, timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), resolved)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------- errors
    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Make an error raised on this rank name the rank, then let it end the process.

        The message gains a "rank r of N" prefix (or, for an exception whose message cannot be rewritten,
        a line saying so goes to stderr), so the job's output says where it failed. The launcher (torchrun)
        sees the non-zero exit and stops the other ranks; a rank still inside a collective gets an error from
        the backend when its peer's connection closes, or at the latest after LORAKIT_DIST_TIMEOUT seconds.
        """
        try:
            yield
        except Exception as exc:
            if self.world > 1:
                where = f"rank {self.rank} of {self.world}"
                if len(exc.args) == 1 and isinstance(exc.args[0], str):
                    exc.args = (f"{where}: {exc.args[0]}",)
                else:
                    print(f"lorakit train: {where} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            raise

    def inject_fault(self, step: int) -> None:
        """Test-only fault injection: raise on rank $LORAKIT_FAIL_ON_RANK at step $LORAKIT_FAIL_AT_STEP (default 1).

        Simulates one rank hitting bad data, to check that the job ends with a clear message, not a hang.
        """
        wanted = os.environ.get(FAIL_RANK_ENV)
        if wanted is None or int(wanted) != self.rank or step != int(os.environ.get(FAIL_STEP_ENV, "1")):
            return
        raise ValueError(f"fault injected by {FAIL_RANK_ENV}={wanted} at step {step} (a test hook simulating a "
                         "bad data shard on one rank); unset it to train normally.")

    # ------------------------------------------------------------------------------------- model
    def seed_per_rank(self, seed: int) -> None:
        """Give every rank its own dropout stream (same seed everywhere would draw the same masks)."""
        if self.world > 1:
            torch.manual_seed(seed * 1_000_003 + self.rank + 1)

    def wrap(self, model: nn.Module, fsdp: bool = False) -> nn.Module:
        """The module to train: DDP over the trainable parameters, FSDP2 when ``fsdp``, or ``model`` itself.

        FSDP shards ``model`` in place (its parameters become DTensors), so build the optimizer afterwards.
        With one process there is nothing to shard or synchronise and ``model`` is returned unchanged.
        """
        if self.world == 1:
            model.to(self.device)
            return model
        if fsdp:
            return self._shard(model)
        from torch.nn.parallel import DistributedDataParallel

        model.to(self.device)
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        # Every rank loaded the same base: skip broadcasting it (DDP would send the whole model at start-up).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        return DistributedDataParallel(model, device_ids=None if self.device.type == "cpu" else [self.device])

    def _shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if self.is_main:  # the structure, without the weights, to consolidate into at the end
            self._skeleton = _meta_copy(model)
        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if hasattr(model, "generate"):  # generate() bypasses forward(): gather the root's parameters for it too
            register_fsdp_forward_method(model, "generate")
        self.sharded = True
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
        if self.world == 1 or last:
            yield
        elif self.sharded:
            model.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)  # type: ignore[operator]
        else:
            with model.no_sync():  # type: ignore[operator]
                yield

    # ------------------------------------------------------------------------------------- collectives
    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def check_agreement(self, model: PeftModel) -> str | None:
        """The adapter digest all ranks agree on (None unless data-parallel with several processes).

        Raises:
            RuntimeError: ranks hold different adapters (their training diverged); lists every digest.
        """
        if self.world == 1 or self.sharded:  # one copy, or one shard per rank: nothing to compare
            return None
        digests = self.gather_object(adapter_digest(model))
        if len(set(digests)) > 1:
            listing = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
            raise RuntimeError(f"the ranks ended training with different adapters ({listing}); they must be "
                               "identical under data parallelism — was the model or data different on some rank?")
        return str(digests[0])

    def consolidate(self, model: nn.Module) -> nn.Module | None:
        """The trained model as one plain (unsharded, CPU) module on rank 0; None on the other ranks.

        Under FSDP every rank takes part in gathering the full state dict (one tensor at a time, offloaded
        to rank 0's CPU), which is loaded into the weight-less copy made before sharding. Otherwise the
        model is already whole.
        """
        if not self.sharded:
            return model if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        skeleton = self._skeleton
        if skeleton is None:
            raise RuntimeError("consolidate() needs the copy wrap(fsdp=True) makes on rank 0; wrap first.")
        missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
        still_meta = [n for n, p in skeleton.named_parameters() if p.is_meta]
        if still_meta or unexpected:
            raise RuntimeError(f"gathering the sharded model left parameters {still_meta[:5]} without values "
                               f"(unexpected keys {unexpected[:5]}); this is a lorakit bug, please report it.")
        del missing  # tied parameters appear once in the state dict and are filled through their alias
        skeleton.eval()
        return skeleton

    def close(self) -> None:
        """Leave the process group (after the last collective of the run).

        All ranks meet at a barrier first: rank 0 still writes the adapter and the summary after the last
        collective, and a rank tearing its gloo connections down while a peer is mid-way through its own
        teardown was seen to abort (SIGABRT, "terminate called without an active exception") in CI."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: the classes Hugging Face lists in ``_no_split_modules``
    (LlamaDecoderLayer, GPT2Block, …), else the entries of the longest ``nn.ModuleList``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    longest: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(longest):
            longest = list(module)
    return longest


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters live on the meta device (no memory); buffers are copied.

    Non-persistent buffers (rotary frequencies) are not in a state dict, so the copy keeps real ones.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)
