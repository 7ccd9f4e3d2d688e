"""Paper-scale LM path: LoRA SFT (peft) of a Hugging Face causal LM on OpenMathInstruct-2-style
data, evaluated by greedy generation on GSM8K- and MATH-500-style sets.

Data sources are ``datasets`` hub ids (``nvidia/OpenMathInstruct-2``, ``openai/gsm8k``,
``HuggingFaceH4/MATH-500``) or local json/jsonl/parquet files with the same fields:
- SFT data: ``problem``, ``generated_solution``, ``expected_answer``
- ``gsm8k``: ``question``, ``answer`` (worked solution ending "#### N")
- ``math500``: ``problem``, ``answer``
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
import torch.nn as nn

from .base import EvalResult, eval_mode
from .lm_common import TokenBatches, extract_answer

BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
PROMPT = "Question: {question}\nAnswer: "


def load(source: str, split: str, config: str | None = None, files=None):
    """A ``datasets`` split from a local file (json, jsonl, parquet, csv), a hub id, or a local folder
    laid out like a hub repo. ``files`` (a pattern or list of them inside the repo or folder, e.g.
    ``data/train_1M-*.parquet``): only those files, read as split ``split``. Without it ``load_dataset``
    downloads and prepares every split of the repo (all of OpenMathInstruct-2) to return one."""
    import datasets

    path = Path(str(source)).expanduser()
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: unsupported data file type (use .json, .jsonl, .parquet or .csv)")
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    if not path.exists() and str(source).startswith(("/", "./", "~")):
        raise FileNotFoundError(f"data file {source} does not exist: check task.train_data / task.eval_data")
    data_files = None
    if files:
        data_files = {split: str(files) if isinstance(files, str) else [str(f) for f in files]}
    return datasets.load_dataset(str(path) if path.is_dir() else str(source), config, data_files=data_files, split=split)


@contextlib.contextmanager
def merged_lora(model: nn.Module):
    """Inside this block the LoRA adapters of a peft model are merged into their base layers
    (peft's ``merge_adapter``: W + scale B A), so that generation runs one matmul per projection
    instead of three. On exit (an exception included) ``unmerge_adapter`` subtracts them again, and
    every adapted base layer's parameters are copied back from a CPU copy taken before the merge:
    subtracting in bf16 does not give back the same bits, and without the copies the frozen base
    would drift at every evaluation. The adapters themselves (and so the optimizer state, which
    holds only theirs) are not changed. A model without adapters, or with them merged already, is
    left as it is. Call it under ``torch.no_grad`` (as ``evaluate`` does)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or any(m.merged for m in layers):
        yield model
        return
    saved = [(p, p.detach().to("cpu", copy=True)) for m in layers for p in m.get_base_layer().parameters()]
    try:
        model.merge_adapter()
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)


def final_answer(text: str) -> str | None:
    """The model's answer: after "####", else the last \\boxed{}, else the last number."""
    for found in (extract_answer(text), (BOXED.findall(text) or [None])[-1], (NUMBER.findall(text) or [None])[-1]):
        if found:
            return normalise(found)
    return None


def is_correct(eval_set: str, text: str, gold: str) -> bool:
    """MATH-style sets (names starting "math"): math-verify (Hugging Face's LaTeX-aware parser and
    sympy equivalence: nested fractions, radicals, \\dfrac, \\left(...\\right), thousands separators);
    GSM8K-style sets: the number after "####" (else the last \\boxed{} or number) equals the gold one."""
    if eval_set.startswith("math"):
        from math_verify import parse, verify

        return bool(verify(parse(f"${gold}$"), parse(text)))
    return final_answer(text) == gold


def normalise(answer: str) -> str:
    answer = str(answer).strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(answer)
        return str(int(value)) if value == int(value) else str(value)
    except ValueError:
        return answer.replace(" ", "")


# Evaluation sets scored by lm-evaluation-harness itself (its task YAMLs: prompts, few-shot examples,
# stop sequences, answer regexes), so that the numbers are comparable with the paper's.
LM_EVAL_TASKS = {"gsm8k": "gsm8k.yaml", "gsm8k_cot": "gsm8k-cot.yaml"}


class LMEvalSets:
    """GSM8K (5-shot; strict "#### N" and flexible last-number extraction) and GSM8K-CoT (8-shot
    chain of thought), run by lm-eval's ``simple_evaluate`` on the model being trained. A source is a
    hub id (lm-eval's default data when it is ``openai/gsm8k``) or local json/jsonl files: for
    ``gsm8k_cot`` a test file; for ``gsm8k`` ``{test: <file>, train: <file>}`` (its 5 examples come from
    the train split). Each set is written as a task YAML that ``include``s lm-eval's own and changes
    only the data source."""

    def __init__(self, sources: dict):
        import tempfile

        import lm_eval
        from lm_eval.tasks import TaskManager

        self.version = lm_eval.__version__
        root = Path(lm_eval.__file__).parent / "tasks" / "gsm8k"
        self.dir = Path(tempfile.mkdtemp(prefix="dopr-lm-eval-"))
        self.tasks = {}
        for name, source in sources.items():
            task = f"dopr_{name}"
            lines = [f"include: {root / LM_EVAL_TASKS[name]}", f"task: {task}"]
            files = self._files(name, source)
            if files:
                lines += ["dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:"]
                lines += [f"    {split}: {path}" for split, path in files.items()]
            elif str(source) != "openai/gsm8k":
                lines.append(f"dataset_path: {source}")
            (self.dir / f"{task}.yaml").write_text("\n".join(lines) + "\n")
            self.tasks[name] = task
        self.manager = TaskManager(include_path=str(self.dir))

    @staticmethod
    def _files(name: str, source) -> dict | None:
        """{split: local file}, or None for a hub id."""
        if isinstance(source, str) and not Path(source).expanduser().exists():
            if source.startswith(("/", "./", "~")):
                raise FileNotFoundError(f"task.eval_data.{name}={source} does not exist")
            return None
        files = {"test": source} if isinstance(source, str) else {split: str(path) for split, path in source.items()}
        if name == "gsm8k" and "train" not in files:
            raise ValueError(f"task.eval_data.gsm8k={source}: lm-eval's 5-shot GSM8K takes its examples from the train split; "
                             f"pass task.eval_data.gsm8k={{test: <file>, train: <file>}}")
        for split, path in files.items():
            if not Path(path).expanduser().exists():
                raise FileNotFoundError(f"task.eval_data.{name}.{split}={path} does not exist")
        return {split: str(Path(path).expanduser().resolve()) for split, path in files.items()}

    def evaluate(self, model, tokenizer, batch_size: int, device, limit) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        results = simple_evaluate(model=lm, tasks=list(self.tasks.values()), task_manager=self.manager, limit=limit,
                                  log_samples=False, bootstrap_iters=0)["results"]
        out = {}
        for name, task in self.tasks.items():
            out[f"accuracy_{name}"] = float(results[task]["exact_match,strict-match"])
            out[f"accuracy_{name}_flexible"] = float(results[task]["exact_match,flexible-extract"])
        return out


class PretrainedLM(TokenBatches):
    metric = "accuracy"
    higher_is_better = True
    val_loss_label = "validation loss (nats per token)"
    metric_label = "exact-answer accuracy (fraction)"

    def __init__(self, cfg, seed: int, device: torch.device):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.seed, self.device = cfg, seed, device
        self.tok = AutoTokenizer.from_pretrained(cfg.pretrained)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.pad_id = self.tok.pad_token_id
        dtype = getattr(torch, cfg.get("dtype") or "float32")
        base = AutoModelForCausalLM.from_pretrained(cfg.pretrained, dtype=dtype)
        lora = cfg.lora
        self.model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM")).to(device)
        data = load(cfg.train_data, cfg.train_split, files=cfg.get("train_files")).shuffle(seed=0)
        need = cfg.train_size + cfg.val_size
        if len(data) < need:
            raise ValueError(f"{cfg.train_data} has {len(data)} examples but train_size + val_size = {need}: lower them")
        self.train = self._encode(data.select(range(cfg.train_size)))
        self.val = self._encode(data.select(range(cfg.train_size, need)))
        self.eval_sets = {}
        lm_eval_sets = {name: source for name, source in cfg.eval_data.items() if name in LM_EVAL_TASKS}
        self.lm_eval = LMEvalSets(lm_eval_sets) if lm_eval_sets else None
        for name, source in cfg.eval_data.items():
            if name in LM_EVAL_TASKS:
                continue
            rows = load(source, "test", "main" if name == "gsm8k" else None)
            if cfg.get("eval_size"):
                rows = rows.select(range(min(cfg.eval_size, len(rows))))
            question = "question" if "question" in rows.column_names else "problem"
            gold = (lambda a: str(a)) if name.startswith("math") else (lambda a: normalise(extract_answer(a) or a))  # noqa: E731
            self.eval_sets[name] = [(r[question], gold(r["answer"])) for r in rows]

    def _encode(self, rows):
        """Tokenised once with ``datasets.map`` (batched, ``task.num_proc`` processes, cached by
        ``datasets``), stored unpadded with each one's ``length`` (for ``task.sampling=bucketed``); labels are
        -100 on the prompt (the loss covers the solution)."""
        tok, max_len, eos = self.tok, self.cfg.max_len, self.tok.eos_token_id

        def tokenise(batch):
            prompts = tok([PROMPT.format(question=q) for q in batch["problem"]], add_special_tokens=True)["input_ids"]
            targets = tok([f"{s}\n#### {a}" for s, a in zip(batch["generated_solution"], batch["expected_answer"])],
                          add_special_tokens=False)["input_ids"]
            ids = [(p + t + [eos])[:max_len] for p, t in zip(prompts, targets)]
            return {"input_ids": ids, "labels": [([-100] * len(p) + t + [eos])[:max_len] for p, t in zip(prompts, targets)],
                    "length": [len(i) for i in ids]}

        return rows.map(tokenise, batched=True, num_proc=self.cfg.get("num_proc"), remove_columns=rows.column_names,
                        desc="tokenising")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = True) -> EvalResult:
        """Greedy accuracy on each evaluation set, with the LoRA weights merged into the base for the
        duration when ``task.merge_lora_for_eval`` (see ``merged_lora``). Eval mode and no_grad: AP
        records nothing here."""
        with eval_mode(model):
            with merged_lora(model) if self.cfg.get("merge_lora_for_eval") else contextlib.nullcontext():
                out = self._evaluate(model)
        return EvalResult(out)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        out = {}
        for name, items in self.eval_sets.items():
            correct = 0
            for start in range(0, len(items), self.cfg.eval_batch_size):
                chunk = items[start : start + self.cfg.eval_batch_size]
                enc = self.tok([PROMPT.format(question=q) for q, _ in chunk], return_tensors="pt", padding=True).to(self.device)
                stop = list(self.cfg.get("stop_strings") or [])  # e.g. the next "Question:" of a model that keeps going
                gen = model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                     pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
                                     **({"stop_strings": stop, "tokenizer": self.tok} if stop else {}))
                texts = self.tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                correct += sum(is_correct(name, t, a) for t, (_, a) in zip(texts, chunk))
            out[f"accuracy_{name}"] = correct / max(1, len(items))
        if self.lm_eval is not None:
            out.update(self.lm_eval.evaluate(model, self.tok, self.cfg.eval_batch_size, self.device, self.cfg.get("eval_size")))
        headline = [v for k, v in out.items() if not k.endswith("_flexible")]  # strict extraction, as the paper's tables
        out["accuracy"] = sum(headline) / max(1, len(headline))
        return out
