"""What both LM variants share: the "#### N" answer format and the token batching and loss.

``lm.py`` (the embedded arithmetic task, which dispatches to ``lm_pretrained.py`` when
``task.pretrained`` is set) and ``lm_pretrained.py`` (the paper-scale LoRA path) both import this
module and not each other."""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Task

ANSWER = re.compile(r"####\s*(-?[\d,\.]+)")


def extract_answer(text: str) -> str | None:
    match = ANSWER.search(text)
    return match.group(1).replace(",", "").rstrip(".") if match else None


class TokenBatches(Task):
    """Batching and the token loss shared by both LM variants. ``self.train``/``self.val`` are either
    (input_ids, labels, attention_mask) tensors right-padded to task.max_len (the embedded task) or
    ``datasets.Dataset``s with ``input_ids`` and ``labels`` lists (the paper-scale path: tokenised once,
    stored unpadded, each batch padded to its own longest sequence). The step's batch is a function of
    (seed, step), so a resumed run sees the same batches: drawn with replacement
    (``task.sampling: replacement``, the default), as epochs of a fresh permutation each
    (``task.sampling: epochs``: every example once per epoch), or as such epochs cut into batches of
    similar lengths (``task.sampling: bucketed``, see ``_bucketed``)."""

    pad_id = 0
    _buckets = None  # (epoch, that epoch's batches) under task.sampling=bucketed
    _train_lengths = None

    def train_batch(self, step: int):
        n, size = self._rows(self.train), self.cfg.batch_size
        sampling = self.cfg.get("sampling") or "replacement"
        if sampling not in ("replacement", "epochs", "bucketed"):
            raise ValueError(f"task.sampling={sampling!r}: choose replacement, epochs or bucketed")
        if sampling in ("epochs", "bucketed"):
            per_epoch = n // size
            if per_epoch == 0:
                raise ValueError(f"task.batch_size={size} exceeds the {n} training examples: lower it or use task.sampling=replacement")
            epoch, k = divmod(step, per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * epoch + 1))
            idx = order[k * size : (k + 1) * size] if sampling == "epochs" else self._bucketed(order[: per_epoch * size], epoch)[k]
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            idx = torch.randint(0, n, (size,), generator=g)
        return self._gather(self.train, idx)

    def _bucketed(self, order: torch.Tensor, epoch: int) -> torch.Tensor:
        """The epoch's batches (one row of indices each) from its permutation ``order`` (the examples
        ``task.sampling=epochs`` would use, in the same order): cut into mega-batches of
        ``task.bucket_batches`` batches, each sorted by length and split into batches, then the batches
        shuffled, so that each is padded to a length close to all of its sequences'. Kept for the epoch."""
        if self._buckets is None or self._buckets[0] != epoch:
            size, lengths = self.cfg.batch_size, self._lengths()
            mega = size * int(self.cfg.get("bucket_batches") or 50)
            batches = torch.cat([chunk[torch.argsort(lengths[chunk], stable=True)].view(-1, size) for chunk in order.split(mega)])
            shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * epoch + 2))
            self._buckets = (epoch, batches[shuffle])
        return self._buckets[1]

    def _lengths(self) -> torch.Tensor:
        """Tokens per training example (computed once)."""
        if self._train_lengths is None:
            data = self.train
            if isinstance(data, tuple):
                self._train_lengths = data[2].sum(1)
            else:  # the paper-scale path stores a "length" column (no token lists read)
                self._train_lengths = torch.tensor(list(data["length"]) if "length" in data.column_names else [len(s) for s in data["input_ids"]])
        return self._train_lengths

    def val_batches(self):
        n, size = self._rows(self.val), self.cfg.get("val_batch_size") or self.cfg.eval_batch_size
        for start in range(0, n, size):
            yield self._gather(self.val, torch.arange(start, min(n, start + size)))

    @staticmethod
    def _rows(data) -> int:
        return data[0].shape[0] if isinstance(data, tuple) else len(data)

    def _gather(self, data, idx: torch.Tensor):
        if isinstance(data, tuple):
            return self._trim(tuple(t[idx] for t in data))
        rows = data[idx.tolist()]
        width = max(map(len, rows["input_ids"]))
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.bool)
        for i, (seq, lab) in enumerate(zip(rows["input_ids"], rows["labels"])):
            ids[i, : len(seq)], labels[i, : len(lab)], mask[i, : len(seq)] = torch.tensor(seq), torch.tensor(lab), True
        return ids.to(self.device), labels.to(self.device), mask.to(self.device)

    def _trim(self, batch):
        """Drop the all-padding columns (batches are right-padded to task.max_len) and move to the device."""
        width = int(batch[2].sum(1).max())
        return tuple(t[:, :width].to(self.device) for t in batch)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        ids, labels, mask = batch
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def loss_weight(self, batch) -> torch.Tensor:
        """The number of predicted tokens (the model shifts labels by one): a micro-batch's share of the
        batch's per-token mean loss."""
        return (batch[1][:, 1:] != -100).sum()

    def row_mask(self, batch) -> torch.Tensor:
        """Real tokens (True) and padding (False): the training loop keeps padding out of AP's statistics."""
        return batch[2]

    def val_loss_terms(self, model: nn.Module, batch) -> tuple[float, int]:
        """(summed NLL, number of predicted tokens) of one batch, so that the validation loss is a
        per-token mean over the whole set, not a mean of per-batch means."""
        tokens = int(self.loss_weight(batch))
        chunk = self.cfg.get("val_loss_chunk")
        if not chunk or getattr(model.config, "final_logit_softcapping", None):
            return float(self.loss(model, batch).detach()) * tokens, tokens
        # The head applied to ``chunk`` predicted positions at a time: the float32 logits of the whole
        # batch (batch x length x vocabulary: ~80 GB for 64 x 1024 x 128K) never exist at once. The same
        # sum as the model's own loss for heads without logit soft-capping (Llama, Qwen, Mistral).
        ids, labels, mask = batch
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        hidden, target = hidden[keep], target[keep]
        head = model.get_output_embeddings()
        total = sum(float(F.cross_entropy(head(hidden[i : i + chunk]).float(), target[i : i + chunk], reduction="sum"))
                    for i in range(0, target.shape[0], chunk))
        return total, tokens
