"""HF's causal-LM conventions on L2AForCausalLM: loss keywords, padding-free packing (position ids or
flash-attention keywords, as `DataCollatorWithFlattening` yields them), refused inputs (masks with holes,
N = 0, 3-D ids, output_attentions, assisted decoding), and compile / export of a cache-less forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

from l2a.models.modeling import _cu_seqlens_from_positions

DOC_LENGTHS = (5, 9, 1, 6)


def _documents(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=gen) for n in DOC_LENGTHS]


def _separate_logits(model, docs: list[torch.Tensor]) -> torch.Tensor:
    """Each document run alone, logits concatenated: (1, sum N, V)."""
    with torch.no_grad():
        return torch.cat([model(doc[None], use_cache=False).logits for doc in docs], dim=1)


def _next_token_cross_entropy(logits: torch.Tensor, docs: list[torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy within each document (float64), from per-document logits."""
    losses, start = [], 0
    for doc in docs:
        n = doc.numel()
        losses.append(F.cross_entropy(logits[0, start : start + n - 1].double(), doc[1:], reduction="none"))
        start += n
    return torch.cat(losses).mean()


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_flattened_batch_equals_separate_documents(flash_kwargs, tiny_l2a):
    """HF's DataCollatorWithFlattening: B = 1, position ids restarting per document, no attention mask."""
    model = tiny_l2a("qwen3", window=4)
    docs = _documents()
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(
        [{"input_ids": doc.tolist()} for doc in docs]
    )
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(DOC_LENGTHS))
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    expected = _separate_logits(model, docs)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
        loss = model(**batch, labels=labels).loss  # the default loss_impl
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    reference_loss = _next_token_cross_entropy(expected, docs)
    torch.testing.assert_close(loss.double(), reference_loss, atol=1e-5, rtol=0)
    # the same tokens as one document differ: the comparison can tell documents apart
    with torch.no_grad():
        joined = model(batch["input_ids"], use_cache=False).logits
    assert (joined - expected).abs().max() > 1e-2


def test_packed_position_ids_with_gaps_start_new_documents(tiny_l2a):
    """A document starts wherever a position is not the previous one + 1 (HF's rule), also mid-count."""
    positions = torch.tensor([[0, 1, 2, 7, 8, 0, 1, 2, 3]])
    torch.testing.assert_close(
        _cu_seqlens_from_positions(positions), torch.tensor([0, 3, 5, 9, 9, 9, 9, 9, 9, 9], dtype=torch.int32)
    )
    model = tiny_l2a("qwen2", window=3)
    ids = torch.randint(1, 300, (1, 9))
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        parts = [
            model(ids[:, a:b], position_ids=positions[:, a:b], use_cache=False).logits
            for a, b in ((0, 3), (3, 5), (5, 9))
        ]
    torch.testing.assert_close(packed, torch.cat(parts, dim=1), atol=1e-5, rtol=0)


def test_unequal_cu_seq_lens_refused(tiny_l2a):
    model = tiny_l2a("qwen2", window=3)
    ids = torch.randint(1, 300, (1, 6))
    q = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k must be equal"):
        model(ids, cu_seq_lens_q=q, cu_seq_lens_k=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="both cu_seq_lens_q and cu_seq_lens_k"):
        model(ids, cu_seq_lens_q=q)


def test_loss_keywords_follow_hf(tiny_l2a):
    model = tiny_l2a("llama", window=4)
    ids = torch.randint(1, 300, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels, loss_impl="plain")
    # independent reference: float64 cross-entropy of each position against the next label
    targets = labels[:, 1:].reshape(-1)
    per_token = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, 300).double(), targets, ignore_index=-100, reduction="none"
    )
    valid = targets != -100
    torch.testing.assert_close(out.loss.double(), per_token.sum() / valid.sum(), atol=1e-5, rtol=0)

    shift_labels = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        shifted = model(ids, shift_labels=shift_labels).loss
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    torch.testing.assert_close(shifted.double(), out.loss.double(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="labels or shift_labels, not both"):
        model(ids, labels=labels, shift_labels=shift_labels)
    torch.testing.assert_close(summed.double(), per_token.sum() / 7, atol=1e-5, rtol=0)

    as_tuple = model(ids, labels=labels, loss_impl="plain", return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_unknown_keyword_is_a_type_error(tiny_l2a):
    model = tiny_l2a("qwen2", window=4)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['lables'\]"):
        model(torch.randint(1, 300, (1, 4)), lables=torch.randint(1, 300, (1, 4)))


@pytest.mark.parametrize(
    "shape, match",
    [((1, 0), "no tokens"), ((6,), r"2-D .*input_ids\[None\]"), ((1, 2, 6), "2-D")],
    ids=["N0", "1-D", "3-D"],
)
def test_bad_input_ids_shapes_refused(shape, match, tiny_l2a):
    model = tiny_l2a("qwen2", window=4)
    with pytest.raises(ValueError, match=match):
        model(torch.randint(1, 300, shape))


def test_attention_mask_with_a_hole_refused(tiny_l2a):
    model = tiny_l2a("qwen2", window=4)
    ids = torch.randint(1, 300, (2, 6))
    holes = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask has a hole"):
        model(ids, attention_mask=holes)
    with pytest.raises(ValueError, match="attention_mask has a hole"):
        model.generate(ids, attention_mask=holes, max_new_tokens=2)
    # left, right and both-sided padding and an empty row are accepted
    ok = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    model(ids, attention_mask=ok)
    model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]))


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_right_padded_prompt_not_continued_with_the_cache(cache_implementation, tiny_l2a):
    model = tiny_l2a("qwen2", window=4)
    ids = torch.randint(1, 300, (2, 6))
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    kwargs = {"max_new_tokens": 2, "do_sample": False}
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(ids, attention_mask=right, **kwargs)
    left = right.flip(-1)
    model.generate(ids, attention_mask=left, **kwargs)


def test_output_attentions_refused_as_argument_and_from_config(tiny_l2a):
    model = tiny_l2a("qwen2", window=4)
    ids = torch.randint(1, 300, (1, 5))
    with pytest.raises(ValueError, match="output_attentions is not supported") as from_argument:
        model(ids, output_attentions=True)
    model.config.output_attentions = True
    with pytest.raises(ValueError, match="output_attentions is not supported") as from_config:
        model(ids)
    assert str(from_argument.value) == str(from_config.value)
    assert model(ids, output_attentions=False).attentions is None


@pytest.mark.parametrize("mode", ["assistant_model", "prompt_lookup"])
def test_assisted_decoding_refused_before_any_forward(mode, tiny_l2a):
    model = tiny_l2a("qwen2", window=4)
    calls = []
    model.model.register_forward_pre_hook(lambda *args: calls.append(1))
    kwargs = (
        {"assistant_model": tiny_l2a("qwen2", window=4)}
        if mode == "assistant_model"
        else {"prompt_lookup_num_tokens": 2}
    )
    with pytest.raises(ValueError, match="assisted / speculative decoding"):
        model.generate(torch.randint(1, 300, (1, 6)), max_new_tokens=3, do_sample=False, **kwargs)
    assert calls == []


def test_l2a_as_assistant_refused(make_base, tiny_l2a):
    main_model = make_base("qwen2")
    with pytest.raises(ValueError, match="assisted / speculative decoding"):
        main_model.generate(
            torch.randint(1, 300, (1, 6)),
            assistant_model=tiny_l2a("qwen2", window=4),
            max_new_tokens=3,
            do_sample=False,
        )


def test_compile_fullgraph_and_export_of_a_cacheless_forward(tiny_l2a):
    """No data-dependent branch (host sync) in a cache-less forward, packed by position ids or padded.
    A decode step with a cache is not covered here (GlobalAttention's skip-when-no-query-is-routed
    branch belongs to the cache path)."""
    model = tiny_l2a("qwen3", window=4)
    docs = _documents(1)
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(doc.numel()) for doc in docs])[None]
    expected = _separate_logits(model, docs)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(ids, position_ids=positions).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    batch = torch.randint(1, 300, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        eager = model(batch, attention_mask=mask, use_cache=False).logits
        compiled_padded = compiled(batch, attention_mask=mask, use_cache=False).logits
        exported = torch.export.export(
            model, (batch,), {"attention_mask": mask, "use_cache": False}, strict=False
        ).module()
        exported_padded = exported(batch, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(compiled_padded, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(exported_padded, eager, atol=1e-5, rtol=0)
