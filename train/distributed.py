"""Processes and devices: one process per GPU under torchrun (DDP), or a single process; the
collective operations the trainer needs, each a no-op in a single process."""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from ldct_node.net.inference import resolve_device


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start_processes(device_name: str) -> tuple[Processes, torch.device]:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    procs = Processes(rank=int(os.environ.get("RANK", "0")), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", procs.local_rank)  # one GPU per torchrun process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if procs.distributed:
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return procs, device


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where supported (no loss scaling needed), else fp16."""
    if device.type != "cuda" or not enabled:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def hardware_description(device: torch.device, procs: Processes) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": device.type, "name": name, "processes": procs.world_size, "torch": torch.__version__}


def stop_processes(procs: Processes) -> None:
    """Leave the process group start_processes joined (nothing to do for a single process)."""
    if procs.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wait_for_all(procs: Processes) -> None:
    """Block until every process gets here (rank 0 has finished writing the epoch's files)."""
    if procs.distributed:
        torch_dist.barrier()


def mean_over_processes(values: dict[str, float], procs: Processes, device: torch.device) -> dict[str, float]:
    """Each value averaged over all processes (the same dict on every rank)."""
    if not procs.distributed:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)  # nccl: CUDA tensors only
    torch_dist.all_reduce(tensor)
    return dict(zip(values, (tensor / procs.world_size).tolist()))


def weights_digest(model: nn.Module) -> str:
    """sha256 over all parameters and buffers, in name order: equal on every DDP replica."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def replica_digests(model: nn.Module, procs: Processes) -> list[str]:
    """Every replica's weight hash, so a run proves its replicas stayed identical."""
    mine = weights_digest(model)
    if not procs.distributed:
        return [mine]
    gathered: list[str | None] = [None] * procs.world_size
    torch_dist.all_gather_object(gathered, mine)
    if len(set(gathered)) != 1:
        raise RuntimeError(f"DDP replicas diverged: weight hashes {gathered}")
    return [str(g) for g in gathered]
