"""The paper-scale LM path's pieces without the entry point: length-bucketed batches, loading only the
requested OpenMathInstruct-2 split's files, and LoRA weights merged for evaluation. Tiny data and a tiny
random Llama; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

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


# --- task.train_files: only the requested OpenMathInstruct-2 split's files ------------------------


def hub_like_folder(root):
    """A folder laid out like the hub repo nvidia/OpenMathInstruct-2: data/<split>-NNNNN-of-NNNNN.parquet
    per split and a README whose YAML header maps each split to its files (as push_to_hub writes it).
    train_1M has two readable files; train_2M one of other rows; train's file is not parquet at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    rows = lambda tag, n: [{"problem": f"{tag} {i}", "generated_solution": f"{i} + 1 = {i + 1}", "expected_answer": str(i + 1),  # noqa: E731
                            "problem_source": "augmented_math"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows("one", 3)), root / "data" / "train_1M-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows("uno", 2)), root / "data" / "train_1M-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows("two", 4)), root / "data" / "train_2M-00000-of-00001.parquet")
    (root / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet: reading it fails")
    splits = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in ("train", "train_1M", "train_2M"))
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{splits}---\n# fixture\n")
    return root


def test_train_files_reads_only_the_requested_splits_files(tmp_path, monkeypatch):
    import datasets
    import pytest

    from experiments.tasks.lm_pretrained import load

    repo = hub_like_folder(tmp_path / "OpenMathInstruct-2")
    with pytest.raises(Exception, match="(?i)parquet"):
        load(repo, "train_1M")  # without task.train_files every split is read: here the unreadable one fails
    rows = load(repo, "train_1M", files="data/train_1M-*.parquet")
    assert sorted(rows["problem"]) == ["one 0", "one 1", "one 2", "uno 0", "uno 1"]  # both of its files, nothing else
    assert set(rows.column_names) == {"problem", "generated_solution", "expected_answer", "problem_source"}
    # a hub id: load_dataset is asked for those files only, as the split of that name
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)))
    load("nvidia/OpenMathInstruct-2", "train_1M", files="data/train_1M-*.parquet")
    assert calls == [(("nvidia/OpenMathInstruct-2", None), {"data_files": {"train_1M": "data/train_1M-*.parquet"}, "split": "train_1M"})]


def test_paper_scale_configs_set_bucketed_batches_only_train_1m_files_and_merged_lora_eval():
    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        paper = compose("train", overrides=["task=lm", "scale=paper"]).task
        eight_b = compose("train", overrides=["task=lm", "scale=paper", "+preset=lm_8b"]).task
        cpu = [compose("train", overrides=[f"task={t}", "scale=cpu"]).task for t in ("lm", "lm_lora")]
    for task in (paper, eight_b):
        assert task.sampling == "bucketed" and task.bucket_batches == 50
        assert task.train_split == "train_1M" and task.train_files == "data/train_1M-*.parquet"
        assert task.merge_lora_for_eval is True
    assert all(t.sampling == "replacement" and not t.train_files and t.merge_lora_for_eval is False for t in cpu)


# --- task.merge_lora_for_eval: merged_lora ---------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_llama(dtype: torch.dtype):
    """A tiny random Llama (base in ``dtype``) with peft LoRA on every projection; the adapters are
    random too (init_lora_weights=False: B is not zero), so merging them changes every base weight."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(config).to(dtype)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_merged_lora_gives_the_same_outputs_and_restores_the_base_bitwise():
    import pytest

    from experiments.tasks.lm_pretrained import merged_lora

    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    # bf16 base (the paper's dtype; float32 adapters, as peft makes them): the merged weights are rounded
    # to bf16, so logits agree to a few bf16 steps; float32: to rounding.
    for dtype, tolerance in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        model = tiny_lora_llama(dtype).eval()
        before = weights(model)
        with torch.no_grad():
            unmerged = model(input_ids=ids).logits.float()
            with model.disable_adapter():
                base_only = model(input_ids=ids).logits.float()
            greedy = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
            with merged_lora(model):
                assert all(m.merged for m in model.modules() if hasattr(m, "merged"))
                merged = model(input_ids=ids).logits.float()
                merged_greedy = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert (merged - unmerged).abs().max() < tolerance, (dtype, (merged - unmerged).abs().max())
        assert (base_only - unmerged).abs().max() > 20 * tolerance  # the adapters matter, so the merge is tested
        if dtype == torch.float32:
            assert torch.equal(merged_greedy, greedy)
        after = weights(model)
        assert all(torch.equal(after[n], before[n]) for n in before)  # base and adapters bitwise as before
        assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))
        # what the copies are for: peft's merge then unmerge alone leaves every base weight changed
        with torch.no_grad():
            model.merge_adapter()
            model.unmerge_adapter()
        drifted = [n for n, p in model.named_parameters() if "base_layer" in n and not torch.equal(p, before[n])]
        assert len(drifted) == 2 * len(TARGETS), drifted
        # an exception inside the block still unmerges and restores
        model = tiny_lora_llama(dtype).eval()
        before = weights(model)
        with pytest.raises(RuntimeError, match="inside"), torch.no_grad(), merged_lora(model):
            raise RuntimeError("inside the block")
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))
    plain = torch.nn.Linear(3, 3)
    with merged_lora(plain) as same:  # not a peft model: left as it is
        assert same is plain


def same(a, b) -> bool:
    """Nested dicts / lists / tensors equal, tensors bitwise."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_merged_evaluation_leaves_ap_statistics_and_the_optimizer_state_alone():
    import copy

    import dopr
    from experiments.tasks.lm_pretrained import merged_lora

    model = tiny_lora_llama(torch.bfloat16)
    opt = dopr.build_optimizer(model, "dopr_adamw", lr=1e-3)
    ap = opt.preconditioner
    ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # a step, then the next step's forward and backward, before an evaluation
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if _ == 0:
            opt.step()
    rows = {layer.name: sum(p.count for p in layer.parts) for layer in ap.layers}
    assert rows and all(rows.values()) and all(".lora_" in name for name in rows)
    state, before = copy.deepcopy(opt.state_dict()), weights(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad(), merged_lora(model):  # as PretrainedLM.evaluate
        model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        model(input_ids=ids)
    model.train()
    assert {layer.name: sum(p.count for p in layer.parts) for layer in ap.layers} == rows  # no rows added
    assert same(opt.state_dict(), state)  # the optimizer state (its base's and AP's), bitwise
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert grads and all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    opt.step()  # and the step goes on from the statistics of the training forward
