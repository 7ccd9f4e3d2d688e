"""A small DDP training run, for test_ddp.py (spawned on gloo/CPU) and by hand:
``python tests/ddp_worker.py`` runs the one-process reference."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import dopr

GLOBAL_BATCH, STEPS = 32, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(17, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.left, self.right = nn.Linear(8, 8), nn.Linear(8, 8)  # share one input (one statistic)
        self.head = nn.Linear(8, 17)

    def forward(self, idx):
        h = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(self.left(h)) * torch.sigmoid(self.right(h)))


def train(rank: int, world: int, init_file: str, out_file: str, all_reduce: bool = True) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = Net()
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    # every row (max_rows_per_dim=None): with subsampling each rank draws its own rows, so two ranks
    # would match one rank only in distribution
    opt = dopr.DoPr(model, base="adamw", lr=1e-2, max_rows_per_dim=None, distributed="auto" if all_reduce else False)
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        batch = torch.randint(0, 17, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(step))
        local = batch[rank * share : (rank + 1) * share]
        logits = model(local[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 17), local[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save(net.state_dict(), out_file)
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still uses it (a race that aborts the process)
        dist.destroy_process_group()


def spawned(rank: int, world: int, init_file: str, out_file: str, all_reduce: bool = True) -> None:
    """mp.spawn entry: train, then leave without interpreter teardown, where gloo's background
    threads were seen to abort a rank ("terminate called without an active exception") under load."""
    train(rank, world, init_file, out_file, all_reduce)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    train(0, 1, "", sys.argv[1] if len(sys.argv) > 1 else "ddp_reference.pt")
