"""Tensor transport between the stage actors: a torch.distributed group (gloo or NCCL) with one
sub-group per in-flight slot.

Why one group per slot: each in-flight segment runs in its own thread in every stage, and a group's
point-to-point messages are matched in order. Giving every slot its own group keeps the slots'
messages apart without a global schedule, so segments of different streams overlap freely.

Every message is one uint8 tensor: a small header `(stream, seq_no, layer, kind, numel)` followed by
the payload's bytes. The receiver knows the payload's shape and dtype from the deterministic schedule
both sides compute, and checks the header, so a schedule mismatch is an error, never silent garbage.
Every wait has a timeout: a dead peer surfaces as a TransportError instead of a hang."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from titans_runtime.errors import TitansError

HEADER_FIELDS = 5  # stream, seq_no, layer, kind, payload numel
HEADER_BYTES = HEADER_FIELDS * 8  # int64s; a multiple of every element size, so payload views align

# Message kinds (the `kind` header field).
KIND_RETRIEVE = 1        # core -> memory: MAC read input
KIND_RETRIEVED = 2       # memory -> core: MAC read output
KIND_UPDATE = 3          # core -> memory: write input
KIND_UPDATED = 4         # memory -> core: gated retrieval after the write
KIND_HIDDEN = 5          # core -> persistent: final hidden states of a segment
KIND_BANK = 6            # persistent -> core: a task's persistent-token bank

RANKS = {"core": 0, "long_term_memory": 1, "persistent_memory": 2}


class TransportError(TitansError):
    """A tensor message failed: peer gone, timeout, or a message out of schedule."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Transport:
    """This rank's end of the stage group."""

    def __init__(self, rank: int, world_size: int, host: str, port: int, n_slots: int, backend: str,
                 timeout_s: float, device: torch.device, loopback: bool = True):
        if loopback and backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep tensor sockets on 127.0.0.1
        self.rank = rank
        self.backend = backend
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        # Gloo moves host tensors: device tensors are staged through host memory.
        self.host_staging = backend == "gloo" and device.type != "cpu"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                                timeout=self.timeout)
        ranks = list(range(world_size))
        self.slot_groups = [dist.new_group(ranks, timeout=self.timeout, backend=backend) for _ in range(n_slots)]
        self.control_group = dist.new_group(ranks, timeout=self.timeout, backend=backend)

    def _group(self, slot: int | None):
        return self.control_group if slot is None else self.slot_groups[slot]

    def send(self, slot: int | None, dst: int, header: tuple[int, int, int, int], payload: Tensor) -> "dist.Work":
        """Start sending; returns the work to wait on (keeps the buffer alive until then)."""
        payload = payload.detach().contiguous()
        head = torch.tensor([*header, payload.numel()], dtype=torch.int64, device=payload.device)
        message = torch.cat((head.view(torch.uint8), payload.view(-1).view(torch.uint8)))
        if self.host_staging:
            message = message.cpu()
        try:
            work = dist.isend(message, dst, group=self._group(slot))
        except Exception as e:  # noqa: BLE001 - torch raises plain RuntimeErrors for peer failures
            raise TransportError(f"rank {self.rank}: send {header} to rank {dst} failed: {e}") from None
        return _Pending(work, message, f"send {header} to rank {dst}", self)

    def recv(self, slot: int | None, src: int, header: tuple[int, int, int, int], shape: tuple[int, ...],
             dtype: torch.dtype) -> Tensor:
        """Receive the message `header` from `src` with a payload of `shape` and `dtype`."""
        numel = 1
        for n in shape:
            numel *= n
        nbytes = HEADER_BYTES + numel * torch.empty((), dtype=dtype).element_size()
        device = torch.device("cpu") if self.host_staging else self.device
        message = torch.empty(nbytes, dtype=torch.uint8, device=device)
        what = f"receive {header} from rank {src}"
        try:
            work = dist.irecv(message, src, group=self._group(slot))
            _wait(work, self.timeout, what, self.rank)
        except TransportError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TransportError(f"rank {self.rank}: {what} failed: {e}") from None
        got = tuple(int(v) for v in message[:HEADER_BYTES].view(torch.int64).tolist())
        expected = (*header, numel)
        if got != expected:
            raise TransportError(f"rank {self.rank}: expected message {expected} from rank {src}, got {got}")
        payload = message[HEADER_BYTES:].view(dtype).view(shape)
        return payload.to(self.device) if self.host_staging else payload

    def close(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may be gone already; nothing left to release
                pass


def _wait(work, timeout: timedelta, what: str, rank: int) -> None:
    try:
        ok = work.wait(timeout)
    except Exception as e:  # noqa: BLE001
        raise TransportError(f"rank {rank}: {what} failed: {e}") from None
    if ok is False:
        raise TransportError(f"rank {rank}: {what} timed out after {timeout.total_seconds():.0f} s")


class _Pending:
    """An isend in progress; holds the buffer until waited on."""

    def __init__(self, work, buffer: Tensor, what: str, transport: Transport):
        self.work, self.buffer, self.what, self.transport = work, buffer, what, transport

    def wait(self) -> None:
        _wait(self.work, self.transport.timeout, self.what, self.transport.rank)
        self.buffer = None
