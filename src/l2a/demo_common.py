"""What the embedded demos (`l2a.demo`, `l2a.demo_aha`) share: the ``kv_retrieval`` task rows, the
standard-library corpus, the training batches, the tiny dense base model, retrieval scoring and the
accuracy-by-distance table."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from l2a.data import byte_tokenizer, stdlib_corpus
from l2a.data.packing import IGNORE_INDEX
from l2a.data.tasks import TaskSample, get_task

if TYPE_CHECKING:
    from l2a.demo import DemoConfig

EMBEDDED_BASE = Path(__file__).parent / "assets" / "demo_base"
"""The dense base both demos start from by default (``base="embedded"``): the tiny Qwen3 of the default
`DemoConfig` sizes, pretrained by this package's own demo pretraining (``l2a demo --base scratch``; the exact
command, seed and its retrieval are in ``provenance.json`` next to the weights)."""

_QUERY = re.compile(rb"\n[a-z]+:( \d+)")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def kv_task_args(config: DemoConfig) -> dict[str, Any]:
    """Keyword arguments of ``get_task("kv_retrieval", ...)`` that make the demo's task samples.

    The queried needle lies more than `window` tokens before its query, even for the first of
    `num_queries` queries: each later query adds one ``"\\nkey: value"`` record after it.
    ``l2a eval --task-arg kv_retrieval.KEY=VALUE`` with these reproduces the training format.
    """
    record = config.key_chars + config.value_digits + 3
    args: dict[str, Any] = {
        "key_chars": config.key_chars,
        "value_digits": config.value_digits,
        "num_queries": config.num_queries,
        "min_distance": config.window + record * config.num_queries,
        "filler": config.filler,
    }
    if config.filler == "corpus":
        args |= {"num_pairs": config.distractors, "corpus_chars": config.corpus_chars}
    return args


@contextmanager
def cpu_run_settings(device: torch.device, threads: int | None) -> Iterator[None]:
    """For a CPU run: ``torch.set_num_threads(threads)`` (None: as is) and deterministic algorithms, both
    restored on exit; nothing on CUDA (its runs would also need CUBLAS_WORKSPACE_CONFIG and are not
    bit-reproducible anyway)."""
    if device.type != "cpu":
        yield
        return
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → cuda when available, else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given (the demo
    accepts no other device; resolution as `l2a eval`'s)."""
    from l2a.evaluation.runner import resolve_device as resolve

    if device != "auto" and not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return resolve(device)


@dataclass
class TaskRow:
    """A task sample laid out as one training/evaluation row of `seq_len` tokens."""

    input_ids: list[int]
    # per query: positions of its answer tokens, " " + the value digits (what `l2a eval` generates)
    answer_positions: list[list[int]]
    distances: list[int]  # per query: tokens from the needle's last token to the query's first value token


def task_row(sample: TaskSample) -> TaskRow:
    ids = sample.input_ids + sample.answer_ids[:-1]  # drop eos: rows end with the last value digit
    start = sample.meta["context_span"][1]
    suffix = bytes(ids[start:])
    answers = [list(range(start + m.start(1), start + m.end(1))) for m in _QUERY.finditer(suffix)]
    prompt_len = len(sample.input_ids)
    needle_ends = [prompt_len - d for d in sample.meta["query_distances"]]
    if len(answers) != len(needle_ends):
        raise RuntimeError(f"parsed {len(answers)} queries, the task reports {len(needle_ends)}")
    distances = [pos[1] - end for pos, end in zip(answers, needle_ends)]  # pos[0] is the space
    return TaskRow(ids, answers, distances)


def task_rows(
    config: DemoConfig, tokenizer: Any, count: int, rng: random.Random, desc: str, progress: bool
) -> list[TaskRow]:
    """``count`` rows of the demo's ``kv_retrieval`` task drawn from ``rng``, right-padded to seq_len."""
    from tqdm.auto import tqdm

    task = get_task("kv_retrieval", **kv_task_args(config))
    answer_len = config.value_digits + 1  # " " + digits (eos dropped)
    rows = []
    for _ in tqdm(range(count), desc=desc, dynamic_ncols=True, disable=not progress):
        length = config.seq_len - answer_len
        row = task_row(task.sample(tokenizer, length, rng))
        # prompts may come out a few tokens off (`length_tolerance`): a longer one is drawn again,
        # asked that much shorter; a shorter one is padded on the right (never scored)
        while len(row.input_ids) > config.seq_len:
            length -= len(row.input_ids) - config.seq_len
            row = task_row(task.sample(tokenizer, length, rng))
        row.input_ids += [tokenizer.pad_token_id] * (config.seq_len - len(row.input_ids))
        rows.append(row)
    return rows


EVAL_STREAM, VALIDATION_STREAM = 1_000, 2_000
"""Offsets of the random streams of the evaluation and validation rows from the run's seed: rows of their own
for every seed below 1000, apart from every run's training pool (stream ``seed``) and from the validation rows
the embedded base was pretrained with (stream 2)."""


def eval_rows(config: DemoConfig, tokenizer: Any, seed: int, progress: bool = False) -> list[TaskRow]:
    """The held-out evaluation rows of a run with ``seed`` (drawn apart from the training pool)."""
    return task_rows(
        config, tokenizer, config.eval_samples, random.Random(EVAL_STREAM + seed), "eval samples", progress
    )


def corpus_ids(config: DemoConfig, tokenizer: Any) -> torch.Tensor:
    """Token ids of the first ``corpus_chars`` characters (whole documents) of the standard-library corpus."""
    chunks, size = [], 0
    for doc in stdlib_corpus(shuffle_seed=0):
        chunks.append(doc)
        size += len(doc)
        if size >= config.corpus_chars:
            break
    ids = tokenizer("\n".join(chunks), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def batches(
    config: DemoConfig, corpus: torch.Tensor, pool: list[TaskRow], rng: random.Random
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches: input_ids and labels (B, N); task rows carry labels on answers only."""
    n = config.seq_len
    while True:
        ids, labels = [], []
        for _ in range(config.batch_size):
            draw = rng.random()
            if draw < config.task_ratio:
                row = pool[rng.randrange(len(pool))]
                x = torch.tensor(row.input_ids)
                y = torch.full_like(x, IGNORE_INDEX)
                for pos in row.answer_positions:
                    y[pos] = x[pos]
            else:
                start = rng.randrange(len(corpus) - n)
                x = corpus[start : start + n]
                y = torch.full_like(x, IGNORE_INDEX)
                y[-config.text_loss_tokens :] = x[-config.text_loss_tokens :]
            ids.append(x)
            labels.append(y)
        yield {"input_ids": torch.stack(ids), "labels": torch.stack(labels)}


def build_base_model(config: DemoConfig, tokenizer: Any) -> torch.nn.Module:
    """A freshly initialised tiny `Qwen3ForCausalLM` over the byte tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    base_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.hidden_size // config.num_heads,
        max_position_embeddings=2 * config.seq_len,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base_config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(base_config)


@torch.no_grad()
def retrieval_hits(
    model: torch.nn.Module, rows: list[TaskRow], batch_size: int
) -> tuple[list[bool], list[float] | None]:
    """Teacher-forced exact match of every query's answer (the space and all value digits predicted greedily).

    Rows go to the model's device in batches of ``batch_size`` (input_ids (B, seq_len)); the model runs
    as it is (no autocast: fp32 weights give fp32 logits).
    Returns one hit per query (rows in order, queries in order) and, for an L2A model, the fraction of
    tokens routed to global attention in each global layer over all tokens of the rows (else None).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    fractions = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids = torch.tensor([row.input_ids for row in chunk])
            out = model(input_ids=ids.to(device))
            pred = out.logits.argmax(-1).cpu()  # (B, N): one transfer per batch, compared on the host
            if getattr(out, "router_fraction", None) is not None:
                fractions.append(out.router_fraction.float().cpu() * len(chunk))
            for b, row in enumerate(chunk):
                for pos in row.answer_positions:
                    p = torch.tensor(pos)
                    hits.append(bool((pred[b, p - 1] == ids[b, p]).all()))
    finally:
        model.train(was_training)
    routed = (torch.stack(fractions).sum(0) / len(rows)).tolist() if fractions else None
    return hits, routed


def distance_buckets(distances: list[int], count: int = 4) -> list[tuple[int, int]]:
    lo, hi = min(distances), max(distances) + 1
    step = math.ceil((hi - lo) / count)
    return [(lo + i * step, min(hi, lo + (i + 1) * step)) for i in range(count) if lo + i * step < hi]


def prepare_data(
    config: DemoConfig, seed: int, progress: bool
) -> tuple[random.Random, Any, torch.Tensor, list[TaskRow], list[TaskRow]]:
    """Seed torch with ``seed``; return the run's data rng, the byte tokenizer, the corpus ids, the training
    pool of task rows (drawn from that rng) and the held-out evaluation rows (`eval_rows`)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = byte_tokenizer()
    corpus = corpus_ids(config, tokenizer)
    pool = task_rows(config, tokenizer, config.task_pool, rng, "task samples", progress)
    held_out = eval_rows(config, tokenizer, seed, progress)
    return rng, tokenizer, corpus, pool, held_out


def accuracy_by_distance(distances: list[int], hits: dict[str, list[bool]]) -> list[dict[str, Any]]:
    """Per needle–query distance bucket (`distance_buckets` of ``distances``, one per query): its bounds,
    query count and, per name of ``hits`` (one hit per query), the fraction of its queries hit."""
    buckets = []
    for lo, hi in distance_buckets(distances):
        index = [i for i, d in enumerate(distances) if lo <= d < hi]
        entry: dict[str, Any] = {"min": lo, "max": hi, "queries": len(index)}
        for name, name_hits in hits.items():
            entry[name] = sum(name_hits[i] for i in index) / max(1, len(index))
        buckets.append(entry)
    return buckets


def pretrain_until_retrieval(
    model: torch.nn.Module,
    config: DemoConfig,
    tokenizer: Any,
    data: Iterator[dict[str, torch.Tensor]],
    seed: int,
    output_dir: str,
    common: dict[str, Any],
    progress: bool,
) -> tuple[Any, list[dict[str, float]]]:
    """Full-attention pretraining of the dense ``model`` on ``data`` (`batches`) for at most
    `config.pretrain_steps` steps, all parameters trainable.

    Every `config.pretrain_check_every` steps the model's retrieval is measured on
    `config.validation_samples` rows of their own (stream `VALIDATION_STREAM` + ``seed``, apart from the
    training pool and the evaluation rows); training stops once it reaches `config.pretrain_target`.
    ``common`` holds the `TrainConfig` fields the caller shares between its phases (seed, device,
    precision, logging, checkpoint). Returns the trainer's result and the checks ``[{"step", "accuracy"}]``.
    """
    from tqdm.auto import tqdm

    from l2a.training import TrainConfig, train

    validation = task_rows(
        config,
        tokenizer,
        config.validation_samples,
        random.Random(VALIDATION_STREAM + seed),
        "validation",
        progress,
    )
    checks: list[dict[str, float]] = []

    def check_retrieval(record: dict[str, Any]) -> None:
        if record["step"] < config.pretrain_check_every * (len(checks) + 1):
            return
        hits, _ = retrieval_hits(model, validation, config.batch_size)
        checks.append({"step": record["step"], "accuracy": sum(hits) / len(hits)})
        if progress:
            tqdm.write(f"pretraining step {record['step']}: dense retrieval {checks[-1]['accuracy']:.1%}")

    def until_retrieval() -> Iterator[dict[str, torch.Tensor]]:
        for batch in data:  # an exhausted stream ends `train` early
            if checks and checks[-1]["accuracy"] >= config.pretrain_target:
                return
            yield batch

    result = train(
        model,
        tokenizer,
        TrainConfig(
            output_dir=output_dir,
            steps=config.pretrain_steps,
            trainable=["*"],
            optim={"lr": config.pretrain_lr, "warmup_steps": min(30, config.pretrain_steps)},
            router={"regularizer_weight": 0.0, "leakage_probability": 0.0},
            # logits in training too: the retrieval check runs the model mid-run
            loss_impl="plain",
            **common,
        ),
        data=until_retrieval(),
        on_log=check_retrieval,
    )
    return result, checks


def base_path(base: str | Path) -> Path | None:
    """The directory ``base`` names (`dense_base`): `EMBEDDED_BASE` for ``"embedded"``, None for
    ``"scratch"``."""
    if str(base) == "scratch":
        return None
    return EMBEDDED_BASE if str(base) == "embedded" else Path(base)


def check_base(base: str | Path, config: DemoConfig) -> None:
    """Raise (FileNotFoundError, ValueError: one line naming the problem) unless ``base`` is ``"scratch"`` or
    a saved dense base of ``config``'s model sizes and at least its sequence length."""
    from transformers import AutoConfig

    path = base_path(base)
    if path is None:
        return
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {str(path)!r} has no config.json")
    got = AutoConfig.from_pretrained(path)
    expected: dict[str, Any] = {
        "model_type": "qwen3",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
    }
    wrong = {k: getattr(got, k, None) for k, v in expected.items() if getattr(got, k, None) != v}
    if getattr(got, "max_position_embeddings", 0) < config.seq_len:
        wrong["max_position_embeddings"] = getattr(got, "max_position_embeddings", None)
        expected["max_position_embeddings"] = f">= seq_len={config.seq_len}"
    if wrong:
        raise ValueError(
            f"base model {str(path)!r} does not match the demo config: has {wrong}, expected {expected} "
            "(--base scratch pretrains a base of the configured sizes)"
        )


def load_base(path: str | Path, config: DemoConfig, device: torch.device) -> torch.nn.Module:
    """A dense base saved by a demo run (``DIR/base``) or `EMBEDDED_BASE`, checked by `check_base`; fp32 on
    ``device``."""
    from transformers import AutoModelForCausalLM

    check_base(path, config)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def dense_base(
    base: str | Path,
    config: DemoConfig,
    tokenizer: Any,
    device: torch.device,
    data: Iterator[dict[str, torch.Tensor]],
    seed: int,
    output_dir: str,
    common: dict[str, Any],
    progress: bool,
    save_to: Path,
) -> tuple[torch.nn.Module, Any, list[dict[str, float]]]:
    """The demo's dense base: ``"embedded"`` loads `EMBEDDED_BASE`, ``"scratch"`` pretrains a fresh model
    (`pretrain_until_retrieval` on ``data``), any other value loads that directory (`load_base`). The base
    is saved with ``tokenizer`` to ``save_to`` (unless it was loaded from there), before any conversion.

    Returns the model, the pretraining's trainer result (None for a loaded base) and its retrieval checks.
    """
    pre, checks = None, []
    path = base_path(base)
    if path is None:
        model = build_base_model(config, tokenizer)
        pre, checks = pretrain_until_retrieval(
            model, config, tokenizer, data, seed, output_dir, common, progress
        )
    else:
        model = load_base(path, config, device)
        if path.resolve() == save_to.resolve():
            return model, pre, checks
    model.save_pretrained(save_to)
    tokenizer.save_pretrained(save_to)
    return model, pre, checks


@dataclass
class DemoStart:
    """What both demos have before their routed phase: the data (`prepare_data`), the trainer settings the
    phases share, and the dense base (`dense_base`) with its retrieval hits on the held-out rows."""

    rng: random.Random
    tokenizer: Any
    corpus: torch.Tensor
    pool: list[TaskRow]
    held_out: list[TaskRow]
    common: dict[str, Any]
    model: torch.nn.Module
    pretrain: Any
    checks: list[dict[str, float]]
    base_hits: list[bool]


def start_demo(
    config: DemoConfig, seed: int, base: str | Path, out: Path, device: torch.device, progress: bool
) -> DemoStart:
    """Data, shared `TrainConfig` fields (fp32 on CPU, bf16 autocast on CUDA; logs under ``out/<phase>``,
    started afresh) and the dense base of a demo run, saved to ``out/base`` (`dense_base`)."""
    rng, tokenizer, corpus, pool, held_out = prepare_data(config, seed, progress)
    common = {
        "seed": seed,
        "device": str(device),
        "precision": "fp32" if device.type == "cpu" else "auto",
        "logging": {"every": 10, "progress_bar": progress, "jsonl": True},
        "checkpoint": {"save_final": False},
    }
    for phase in ("pretrain", "routed"):  # the trainer appends to its log: start this run's afresh
        (out / phase / "log.jsonl").unlink(missing_ok=True)
    model, pre, checks = dense_base(
        base,
        config,
        tokenizer,
        device,
        batches(config, corpus, pool, rng),
        seed,
        str(out / "pretrain"),
        common,
        progress,
        out / "base",
    )
    base_hits, _ = retrieval_hits(model, held_out, config.batch_size)
    return DemoStart(rng, tokenizer, corpus, pool, held_out, common, model, pre, checks, base_hits)
