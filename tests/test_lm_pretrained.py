"""The paper-scale LM path's pieces without the entry point: length-bucketed batches, loading only the
requested OpenMathInstruct-2 split's files, and LoRA weights merged for evaluation. Tiny data and a tiny
random Llama; nothing is downloaded."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from experiments.tasks.lm_common import TokenBatches

# --- task.sampling=bucketed -----------------------------------------------------------------------


class Batches(TokenBatches):
    """The batching of the paper-scale path on given data: a ``datasets.Dataset`` of unpadded token
    lists (as ``PretrainedLM._encode`` stores them) or right-padded tensors (as the embedded task)."""

    def __init__(self, data, seed: int, sampling: str, batch_size: int = 8, bucket_batches: int = 10):
        self.cfg = OmegaConf.create({"batch_size": batch_size, "sampling": sampling, "bucket_batches": bucket_batches})
        self.seed, self.device, self.train = seed, torch.device("cpu"), data


def varied_lengths(n: int = 400, low: int = 100, high: int = 1024) -> list[int]:
    return torch.randint(low, high + 1, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def as_dataset(lengths):
    """Example i is i + 1 repeated: its first token names it (0 is padding)."""
    import datasets

    ids = [[i + 1] * n for i, n in enumerate(lengths)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "length": list(lengths)})


def as_tensors(lengths):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = i + 1
    return ids, ids.clone(), ids != 0


def epoch_batches(task: Batches, epoch: int, per_epoch: int) -> list[torch.Tensor]:
    return [task.train_batch(epoch * per_epoch + k) for k in range(per_epoch)]


def test_bucketed_batches_cover_each_example_once_per_epoch_with_far_less_padding():
    import pytest

    lengths = varied_lengths(403)  # 100..1024 tokens (the paper data's range); 50 batches of 8 per epoch, 3 left over
    per_epoch = len(lengths) // 8
    names = lambda batches: sorted(int(i) for ids, _, _ in batches for i in ids[:, 0])  # noqa: E731
    padding = lambda batches: sum(int((~mask).sum()) for _, _, mask in batches)  # noqa: E731
    for data in (as_dataset(lengths), as_tensors(lengths)):
        bucketed, plain = Batches(data, seed=0, sampling="bucketed"), Batches(data, seed=0, sampling="epochs")
        for epoch in range(2):
            batches, reference = epoch_batches(bucketed, epoch, per_epoch), epoch_batches(plain, epoch, per_epoch)
            seen = names(batches)
            assert len(set(seen)) == len(seen) == per_epoch * 8  # each example at most once, a full epoch's worth
            assert seen == names(reference)  # the examples task.sampling=epochs sees in that epoch, regrouped
            assert all(torch.equal(mask.sum(1), torch.tensor([lengths[int(i) - 1] for i in ids[:, 0]])) for ids, _, mask in batches)
            assert padding(batches) < 0.2 * padding(reference), (padding(batches), padding(reference))
    with pytest.raises(ValueError, match="bucketed"):
        Batches(as_dataset(lengths), seed=0, sampling="bucket").train_batch(0)


def test_bucketed_batches_are_a_function_of_seed_and_step():
    data = as_dataset(varied_lengths())
    per_epoch = 50
    first = Batches(data, seed=3, sampling="bucketed")
    steps = [0, 7, 49, 50, 93, 120]
    expected = [first.train_batch(s)[0] for s in steps]
    resumed = Batches(data, seed=3, sampling="bucketed")  # a resumed run: a fresh task, steps asked out of order
    assert all(torch.equal(resumed.train_batch(s)[0], e) for s, e in reversed(list(zip(steps, expected))))
    other = Batches(data, seed=4, sampling="bucketed")
    assert not all(torch.equal(other.train_batch(s)[0], e) for s, e in zip(steps, expected))
    # a new order each epoch, and the batch order is shuffled (not long to short within a mega-batch)
    assert not torch.equal(first.train_batch(0)[0], first.train_batch(per_epoch)[0])
    widths = [first.train_batch(k)[0].shape[1] for k in range(10)]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
