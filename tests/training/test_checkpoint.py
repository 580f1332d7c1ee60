"""Checkpoints: exact resume (bit-identical losses), from_pretrained loading, atomic writes, keep-last-K."""

from __future__ import annotations

import pytest
import torch

from l2a.data import load_tokenizer
from l2a.models import L2AForCausalLM
from l2a.training import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimConfig,
    RouterConfig,
    TrainConfig,
    train,
)
from l2a.training.checkpoint import (
    CorruptCheckpointError,
    check_checkpoint,
    latest_good_checkpoint,
    list_checkpoints,
    save_checkpoint,
)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.txt").write_text(
            f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i)
        )
    return root


MIXES = {
    "text": {},
    "text+task": {"task": "kv_retrieval", "task_ratio": 0.5, "task_kwargs": {"min_distance": 8}},
}


def _config(out, corpus, mix="text", **checkpoint) -> TrainConfig:
    return TrainConfig(
        output_dir=str(out),
        device="cpu",
        steps=4,
        grad_accum_steps=2,
        data=DataConfig(sources=[str(corpus)], seq_len=48, **MIXES[mix]),
        optim=OptimConfig(lr=1e-2, warmup_steps=1),
        router=RouterConfig(regularizer_weight=1e-2, regularizer_ramp_steps=3, leakage_probability=0.5),
        logging=LoggingConfig(every=1, progress_bar=False),
        checkpoint=CheckpointConfig(**checkpoint),
    )


@pytest.mark.parametrize("mix", list(MIXES))
def test_resume_is_bit_identical(make_l2a, corpus, tmp_path, mix):
    tokenizer = load_tokenizer("byte")
    full = train(make_l2a(), tokenizer, _config(tmp_path / "full", corpus, mix), data=None)

    class Crash(Exception):
        pass

    def crash_at_step_3(record):
        if record["step"] == 3:
            raise Crash

    with pytest.raises(Crash):  # killed during step 3, after the step-2 checkpoint
        train(
            make_l2a(),
            tokenizer,
            _config(tmp_path / "cut", corpus, mix, every=2),
            data=None,
            on_log=crash_at_step_3,
        )
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-000002"]

    # a fresh model (other init) resumes from the checkpoint: weights, optimizer, schedule, data, RNG
    resumed = train(
        make_l2a(seed=1), tokenizer, _config(tmp_path / "cut", corpus, mix, every=2, resume="auto"), data=None
    )
    assert [r["step"] for r in resumed.history] == [3, 4]
    for a, b in zip(full.history[2:], resumed.history, strict=True):
        for key in (
            "loss",
            "lm_loss",
            "router_regularizer",
            "grad_norm",
            "lambda",
            "lr",
            "sparsity_per_layer",
        ):
            assert a[key] == b[key], key
        assert a["leakage_steps"] == b["leakage_steps"]


def test_checkpoint_loads_with_from_pretrained(make_l2a, make_batches, tmp_path):
    model = make_l2a()
    config = TrainConfig(
        output_dir=str(tmp_path),
        device="cpu",
        steps=3,
        logging=LoggingConfig(progress_bar=False),
        checkpoint=CheckpointConfig(every=1, keep_last=2),
    )
    result = train(model, load_tokenizer("byte"), config, data=make_batches(3))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000002", "step-000003"]
    loaded = L2AForCausalLM.from_pretrained(result.checkpoint)
    for name, param in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], param, rtol=0, atol=0)
    assert load_tokenizer(str(result.checkpoint)).decode([104, 105]) == "hi"


def test_save_never_overwrites_and_cleans_interrupted(make_l2a, tmp_path):
    model = make_l2a()
    stale = tmp_path / ".step-000001.tmp"
    stale.mkdir()
    (stale / "junk").write_text("x")
    kwargs = dict(
        model=model, model_state=None, trainer_state={"step": 1}, rank_state={}, config={}, keep_last=3
    )
    path = save_checkpoint(tmp_path, 1, **kwargs)
    assert path.name == "step-000001" and not stale.exists() and not (path / "junk").exists()
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path, 1, **kwargs)


def _saved(model, root, steps):
    kwargs = dict(
        model=model, model_state=None, trainer_state={"step": 0}, rank_state={}, config={}, keep_last=9
    )
    return [save_checkpoint(root, step, **kwargs) for step in steps]


CORRUPTIONS = {
    "truncated-weights": ("model.safetensors", lambda b: b[: len(b) // 2], "model.safetensors is truncated"),
    "empty-weights": ("model.safetensors", lambda b: b"", "model.safetensors is truncated"),
    "garbage-trainer-state": ("trainer_state.pt", lambda b: b"garbage", "trainer_state.pt is unreadable"),
    "truncated-rank-state": ("rank_00000.pt", lambda b: b[:-30], "rank_00000.pt is unreadable"),
    "garbage-config": ("config.json", lambda b: b"{", "config.json is not valid JSON"),
    "missing-trainer-state": ("trainer_state.pt", None, "has no trainer_state.pt"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_check_checkpoint_names_the_bad_file(make_l2a, tmp_path, name):
    (path,) = _saved(make_l2a(), tmp_path, [1])
    check_checkpoint(path)
    file, corrupt, message = CORRUPTIONS[name]
    data = (path / file).read_bytes()
    (path / file).unlink()
    if corrupt is not None:
        (path / file).write_bytes(corrupt(data))
    with pytest.raises(CorruptCheckpointError, match=message):
        check_checkpoint(path)


def test_latest_good_checkpoint_moves_bad_ones_aside(make_l2a, tmp_path):
    paths = _saved(make_l2a(), tmp_path, [1, 2, 3])
    (paths[2] / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.warns(
        UserWarning, match=r"step-000003/trainer_state.pt is unreadable .*resuming from step-000002"
    ):
        assert latest_good_checkpoint(tmp_path) == paths[1]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert (tmp_path / "step-000003.corrupt" / "trainer_state.pt").read_bytes() == b"garbage"


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(make_l2a, tmp_path):
    paths = _saved(make_l2a(), tmp_path, [1, 2])
    for path in paths:
        (path / "rank_00000.pt").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="no readable checkpoint to resume from: .*step-000002"):
        latest_good_checkpoint(tmp_path)
    assert list_checkpoints(tmp_path) == paths


def test_explicit_corrupt_resume_fails_before_training(make_l2a, make_batches, tmp_path):
    (path,) = _saved(make_l2a(), tmp_path / "old", [1])
    (path / "model.safetensors").write_bytes(b"\x00" * 16)
    config = TrainConfig(
        output_dir=str(tmp_path / "run"),
        device="cpu",
        steps=2,
        logging=LoggingConfig(progress_bar=False),
        checkpoint=CheckpointConfig(resume=str(path)),
    )
    with pytest.raises(CorruptCheckpointError, match="model.safetensors has an unreadable header"):
        train(make_l2a(), load_tokenizer("byte"), config, data=make_batches(2))
    assert not (tmp_path / "run" / "log.jsonl").exists()
