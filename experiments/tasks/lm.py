"""Autoregressive LM task: next-token loss on worked solutions; the rollout metric is the
exact-answer accuracy of greedy generations, by number of reasoning steps.

Embedded default (no download): a small Llama-style model (``transformers.LlamaConfig``) trained
from scratch on generated multi-step arithmetic word problems with step-by-step solutions and a
GSM8K-style final line ("#### 42"), tokenised by characters. Longer chains mean more generated
tokens conditioned on the model's own earlier output: that is where test-time feedback shows.

Paper scale (``task.pretrained=<model path or hub id>``): LoRA SFT of a causal LM on
OpenMathInstruct-2-style data (problem, generated_solution, expected_answer), evaluated on
GSM8K-style data (question, answer ending "#### N"). See ``lm_pretrained.PretrainedLM``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn as nn

from .base import EvalResult, check_sizes, eval_mode
from .lm_common import TokenBatches, extract_answer

def make_problem(rng: random.Random, n_steps: int, operand_max: int = 9, total_max: int = 99) -> dict:
    """An arithmetic chain of ``n_steps`` additions/subtractions of 1..``operand_max``, every running
    total kept in 0..``total_max``, and its worked solution: one "a+b=c." per step, then "#### answer".

    The question is compact ("23 +5 -7 +2 = ?") so that long chains stay short in tokens; the
    solution must carry each intermediate total forward from the model's own previous line, which is
    where errors compound with the number of steps."""
    total = start = rng.randint(2, min(30, total_max))
    ops, lines = [], []
    for _ in range(n_steps):
        n = rng.randint(1, operand_max)
        if total - n >= 0 and (total + n > total_max or rng.random() < 0.5):
            ops.append(f"-{n}")
            lines.append(f"{total}-{n}={total - n}.")
            total -= n
        else:
            ops.append(f"+{n}")
            lines.append(f"{total}+{n}={total + n}.")
            total += n
    return {"question": " ".join([str(start), *ops, "= ?"]), "solution": " ".join(lines) + f" #### {total}",
            "answer": str(total), "steps": n_steps}


class CharTokenizer:
    """Characters as tokens (a fixed printable alphabet), plus pad, bos and eos."""

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self):
        alphabet = "\n !#+-=?.,0123456789" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        self.itos = ["<pad>", "<bos>", "<eos>"] + list(alphabet)
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the LM task's alphabet") from None

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids if i > self.EOS)


def generate_split(n: int, seed: int, steps: list[int], cache_dir: str | None, operand_max: int = 9, total_max: int = 99):
    """``n`` problems (lengths drawn uniformly from ``steps``) as a ``datasets.Dataset``,
    generated once and cached on disk (the cache key is the generator and its arguments)."""
    import datasets

    def gen(n, seed, steps, operand_max, total_max):
        rng = random.Random(seed)
        for _ in range(n):
            yield make_problem(rng, rng.choice(steps), operand_max, total_max)

    kwargs = {"n": n, "seed": seed, "steps": tuple(steps), "operand_max": operand_max, "total_max": total_max}  # a list would be sharded
    return datasets.Dataset.from_generator(gen, gen_kwargs=kwargs, cache_dir=cache_dir)


def encode_examples(tok: CharTokenizer, examples, max_len: int):
    """(input_ids, labels, attention_mask), right-padded; labels are -100 on the question (the loss
    covers the worked solution and the answer, as in SFT) and on padding."""
    n = len(examples)
    ids = torch.full((n, max_len), tok.PAD, dtype=torch.long)
    labels = torch.full((n, max_len), -100, dtype=torch.long)
    for i, ex in enumerate(examples):
        prompt = [tok.BOS] + tok.encode(ex["question"] + "\n")
        target = tok.encode(ex["solution"]) + [tok.EOS]
        seq = prompt + target
        if len(seq) > max_len:
            raise ValueError(f"a problem is {len(seq)} tokens long but task.max_len={max_len}: raise task.max_len")
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt) : len(seq)] = torch.tensor(target)
    return ids, labels, ids.ne(tok.PAD)


def build_llama(cfg, tok: CharTokenizer) -> nn.Module:
    """A freshly initialised small Llama (``transformers.LlamaConfig``) of ``task.model``'s sizes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    config = LlamaConfig(vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.heads,
                         max_position_embeddings=cfg.max_len + cfg.max_new_tokens, tie_word_embeddings=False,
                         pad_token_id=tok.PAD, bos_token_id=tok.BOS, eos_token_id=tok.EOS)
    return LlamaForCausalLM(config)


class ArithmeticLM(TokenBatches):
    """The embedded default (see the module docstring)."""

    metric = "accuracy"
    higher_is_better = True
    val_loss_label = "validation loss (nats per token)"
    metric_label = "exact-answer accuracy (fraction)"
    horizon_label = "reasoning steps in the problem"

    def __init__(self, cfg, seed: int, device: torch.device):
        self.cfg, self.seed, self.device = cfg, seed, device
        self.tok = CharTokenizer()
        cache = str(Path(cfg.data_dir).expanduser()) if cfg.data_dir else None
        gen = {"cache_dir": cache, "operand_max": cfg.operand_max, "total_max": cfg.total_max}
        hard = cfg.get("hard")  # a second, harder family of problems mixed into training, validation and the headline
        n_hard = round(hard.fraction * cfg.train_size) if hard else 0
        v_hard = round(hard.fraction * cfg.val_size) if hard else 0
        train = list(generate_split(cfg.train_size - n_hard, 1, cfg.train_steps, **gen))
        val = list(generate_split(cfg.val_size - v_hard, 2, cfg.train_steps, **gen))
        if hard:
            hgen = {"cache_dir": cache, "operand_max": hard.operand_max, "total_max": hard.total_max}
            train += list(generate_split(n_hard, 21, cfg.train_steps, **hgen))
            val += list(generate_split(v_hard, 22, cfg.train_steps, **hgen))
        self.train = encode_examples(self.tok, train, cfg.max_len)
        self.val = encode_examples(self.tok, val, cfg.max_len)
        # Rollout problems: a fixed set per chain length. The headline `accuracy` covers the lengths
        # seen in training (accuracy_steps<k>); longer chains are reported apart (accuracy_extrap<k>).
        extrap = list(cfg.get("extrap_steps") or [])
        if set(cfg.eval_steps) - set(cfg.train_steps) or set(extrap) & set(cfg.train_steps):
            raise ValueError(f"task.eval_steps={list(cfg.eval_steps)} must be training lengths (task.train_steps={list(cfg.train_steps)}) "
                             f"and task.extrap_steps={extrap} must not be: move the longer lengths to task.extrap_steps")
        self.eval_sets = {f"steps{k}": list(generate_split(cfg.eval_per_length, 100 + k, [k], **gen)) for k in cfg.eval_steps}
        if hard:  # reported as accuracy_hard<k>, inside the headline: the same number of problems per length as the easy ones
            self.eval_sets.update({f"hard{k}": list(generate_split(cfg.eval_per_length, 500 + k, [k], **hgen)) for k in cfg.eval_steps})
        self.extrap_sets = {f"extrap{k}": list(generate_split(cfg.eval_per_length, 100 + k, [k], **gen)) for k in extrap}
        # Checkpoint selection: other problems of the training lengths (seed 300 + k, any question that
        # also appears in the reported set dropped), so that "best" numbers are not chosen on what they report.
        self.select_sets = {}
        if cfg.get("select_per_length"):
            families = [("steps", 300, gen)] + ([("hard", 700, hgen)] if hard else [])  # (name, seed base, generator)
            for k in cfg.eval_steps:
                for name, base, family in families:
                    reported = {p["question"] for p in self.eval_sets[f"{name}{k}"]}
                    self.select_sets[f"{name}{k}"] = [p for p in generate_split(cfg.select_per_length, base + k, [k], **family)
                                                      if p["question"] not in reported]
        torch.manual_seed(seed)
        self.model = build_llama(cfg, self.tok).to(device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = True) -> EvalResult:
        """Greedy generation (batched, left-padded, KV cache through ``generate``); exact match of
        the number after "####". The extrapolation lengths (not in the headline, and the longest generations) are
        scored only at the final evaluation (``final``), so that intermediate rollouts cost less."""
        with eval_mode(model):
            out, correct_all, total_all = {}, 0, 0
            outcomes = {}  # per problem, 1 if right: the run record keeps it (intervals can nest problems in seeds)
            for name, problems in {**self.eval_sets, **(self.extrap_sets if final else {})}.items():
                items = self._score(model, problems)
                outcomes[f"accuracy_{name}"] = items
                out[f"accuracy_{name}"] = sum(items) / len(problems)
                if name in self.eval_sets:
                    correct_all += sum(items)
                    total_all += len(problems)
            out["accuracy"] = correct_all / total_all  # training lengths only
            if self.select_sets:  # the training loop picks the best checkpoint by select_accuracy
                chosen = [c for problems in self.select_sets.values() for c in self._score(model, problems)]
                out["select_accuracy"] = sum(chosen) / len(chosen)
        return EvalResult(out, outcomes)

    @torch.no_grad()
    def light_evaluate(self, model: nn.Module) -> EvalResult:
        """The budget axis's cheaper point: accuracy over the first ``task.light_per_length`` reported problems of each
        training length (the same for every optimizer), scored together (lengths mixed in a batch, so a few batches
        instead of one per length and set), no selection problems, no extrapolation lengths."""
        with eval_mode(model):
            k = self.cfg.get("light_per_length")
            problems = [p for ps in self.eval_sets.values() for p in (ps[:k] if k else ps)]
            items = self._score(model, problems)
        return EvalResult({"accuracy": sum(items) / len(items)})

    def _score(self, model: nn.Module, problems: list[dict]) -> list[int]:
        """1 where the greedy generation's "#### N" matches the problem's answer, else 0."""
        items = []
        for start in range(0, len(problems), self.cfg.eval_batch_size):
            chunk = problems[start : start + self.cfg.eval_batch_size]
            prompts = [[self.tok.BOS] + self.tok.encode(p["question"] + "\n") for p in chunk]
            width = max(map(len, prompts))
            ids = torch.full((len(chunk), width), self.tok.PAD, dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p)
            ids = ids.to(self.device)
            # Budget: the longest reference solution in the chunk plus slack (capped by task.max_new_tokens); a
            # right answer needs no more, and a model that never stops costs no more than that.
            budget = min(self.cfg.max_new_tokens, max(len(p["solution"]) for p in chunk) + 8)
            gen = model.generate(input_ids=ids, attention_mask=ids.ne(self.tok.PAD), max_new_tokens=budget,
                                 do_sample=False, pad_token_id=self.tok.PAD, eos_token_id=self.tok.EOS)
            items += [int(extract_answer(self.tok.decode(row)) == p["answer"]) for p, row in zip(chunk, gen[:, width:].tolist())]
        return items


def check_settings(cfg) -> None:
    """The sizes of both LM paths (the embedded task's own only without ``task.pretrained``), checked before
    any data is made; errors name the setting. The longest problem against ``task.max_len`` is checked
    where the problems are encoded (encode_examples), also before training."""
    check_sizes(cfg, {"batch_size": 1, "train_size": 1, "val_size": 1, "eval_batch_size": 1, "val_batch_size": 1, "max_len": 2,
                      "max_new_tokens": 1, "bucket_batches": 1, "val_loss_chunk": 1, "eval_size": 1, "num_proc": 1, "light_per_length": 1},
                nullable=("val_batch_size", "bucket_batches", "val_loss_chunk", "eval_size", "num_proc", "light_per_length"))
    if cfg.get("pretrained"):
        return
    check_sizes(cfg, {"eval_per_length": 1, "select_per_length": 0, "operand_max": 1, "total_max": 1, "train_steps": 1, "eval_steps": 1,
                      "extrap_steps": 1, "model.hidden_size": 1, "model.intermediate_size": 1, "model.layers": 1, "model.heads": 1},
                nullable=("select_per_length",), may_be_empty=("extrap_steps",))
    hard = cfg.get("hard")
    if hard is not None:
        check_sizes(cfg, {"hard.operand_max": 1, "hard.total_max": 1})
        if not 0 < hard.fraction < 1:
            raise ValueError(f"task.hard.fraction={hard.fraction} must lie in (0, 1): the share of training and validation problems "
                             "drawn from the harder family (task.hard=null for none)")
    if cfg.model.hidden_size % cfg.model.heads:
        raise ValueError(f"task.model.hidden_size={cfg.model.hidden_size} is not a multiple of task.model.heads={cfg.model.heads}: "
                         f"each attention head gets hidden_size / heads dimensions; change one of them")


def build(cfg, seed: int, device: torch.device):
    check_settings(cfg)
    if cfg.get("pretrained"):
        from .lm_pretrained import PretrainedLM

        return PretrainedLM(cfg, seed, device)
    return ArithmeticLM(cfg, seed, device)
