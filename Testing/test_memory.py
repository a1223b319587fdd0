"""MAIS memory bank and memory attention: FIFO, variants, serialisation, incrementality, protocol."""

from __future__ import annotations

import pytest
import torch

from MAISSegmentLib import ConfigError, MemoryBank, build_model
from MAISSegmentLib.model.config import MemoryConfig, get_preset
from MAISSegmentLib.model.memory_attention import MemoryAttention


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter random values (the zero-initialised branches too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = build_model("sam-med3d-tiny")
    randomise(m)
    return m


@pytest.fixture()
def embedding(model):
    with torch.no_grad():
        return model.encode_image(torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1)))


def clicks(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pts = torch.randint(0, 128, (1, n, 3), generator=g).float()
    lab = (torch.rand(1, n, generator=g) > 0.4).float()
    lab[0, 0] = 1
    return pts, lab


def run(model, embedding, pts, lab, bank, upto=None):
    prev, outs = None, []
    with torch.no_grad():
        for t in range(upto or pts.shape[1]):
            out = model.step(embedding, pts[:, : t + 1], lab[:, : t + 1], prev, bank=bank)
            prev = out.low_res_logits
            outs.append(out)
    return outs


def test_memory_attention_parameter_count_at_384():
    block = MemoryAttention(384, MemoryConfig())
    n = sum(p.numel() for p in block.parameters())
    print(f"memory attention parameters at d=384: {n:,}")
    assert n == 2_836_880  # paper: ~2.84 M
    assert MemoryAttention(384, MemoryConfig(variant="dense")).dense_dim == 48


def test_bank_is_fifo_with_capacity():
    bank = MemoryBank(capacity=3)
    for i in range(5):
        bank.push(torch.full((1, 6), float(i)), torch.full((6, 2, 2, 2), float(i)))
    assert len(bank) == 3 and bank.total_pushed == 5
    assert [e.index for e in bank.entries] == [2, 3, 4]
    assert [e.sparse[0, 0].item() for e in bank.entries] == [2.0, 3.0, 4.0]
    bank.clear()
    assert len(bank) == 0 and bank.total_pushed == 0


@pytest.mark.parametrize(
    ("variant", "sparse", "dense"), [("sparse", True, False), ("dense", False, True), ("sparse+dense", True, True)]
)
def test_bank_variants_keep_their_halves_and_round_trip(variant, sparse, dense, tmp_path):
    bank = MemoryBank(capacity=4, variant=variant)
    for i in range(6):
        bank.push(torch.randn(1 + i % 2, 6), torch.randn(6, 2, 2, 2))
    assert all((e.sparse is not None) == sparse and (e.dense is not None) == dense for e in bank.entries)
    path = tmp_path / "bank.pt"
    torch.save(bank.to_dict(), path)
    data = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in data.values())
    back = MemoryBank.from_dict(data)
    assert (back.capacity, back.variant, back.total_pushed, len(back)) == (4, variant, 6, 4)
    assert [e.index for e in back.entries] == [e.index for e in bank.entries]
    for a, b in zip(bank.entries, back.entries):
        assert (a.sparse is None and b.sparse is None) or torch.equal(a.sparse, b.sparse)
        assert (a.dense is None and b.dense is None) or torch.equal(a.dense, b.dense)
    assert len(MemoryBank.from_dict(MemoryBank(2).to_dict())) == 0


def test_bank_rejects_bad_options_and_entries():
    with pytest.raises(ConfigError, match="variant"):
        MemoryBank(variant="both")
    with pytest.raises(ConfigError, match="capacity"):
        MemoryBank(capacity=0)
    with pytest.raises(ValueError, match="sparse"):
        MemoryBank().push(torch.randn(6), torch.randn(6, 2, 2, 2))
    with pytest.raises(ValueError, match="MemoryBank"):
        MemoryBank.from_dict({"capacity": torch.tensor(3)})


def test_memory_off_is_sam_med3d_inference_loop(model, embedding):
    """bank=None reproduces SAM-Med3D's loop: all clicks, masks=prev (zeros first), multimask False."""
    pts, lab = clicks(4)
    outs = run(model, embedding, pts, lab, bank=None)
    prev = torch.zeros(1, 1, 32, 32, 32)
    pe = model.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        for t in range(4):
            s, d = model.prompt_encoder(points=(pts[:, : t + 1], lab[:, : t + 1]), boxes=None, masks=prev)
            prev, _ = model.mask_decoder(embedding, pe, s, d, multimask_output=False)
            assert torch.equal(prev, outs[t].low_res_logits)
            assert not outs[t].used_memory


def test_first_interaction_unconditioned_then_memory_is_used(model, embedding):
    pts, lab = clicks(3)
    with_memory = run(model, embedding, pts, lab, model.new_memory_bank())
    without = run(model, embedding, pts, lab, None)
    assert torch.equal(with_memory[0].low_res_logits, without[0].low_res_logits)
    assert [o.used_memory for o in with_memory] == [False, True, True]
    assert not torch.allclose(with_memory[2].low_res_logits, without[2].low_res_logits)


def test_current_interaction_is_pushed_before_attention(model, embedding):
    pts, lab = clicks(3)
    bank = model.new_memory_bank()
    outs = run(model, embedding, pts, lab, bank)
    assert len(bank) == 3
    with torch.no_grad():  # newest dense memory = embedding of the mask this interaction started from
        expected_dense = model.prompt_encoder.embed_mask(outs[1].low_res_logits)[0]
        expected_click = model.prompt_encoder.embed_points(pts[:, 2:3], lab[:, 2:3], pad=False)[0]
    assert torch.allclose(bank.entries[-1].dense, expected_dense)
    assert torch.allclose(bank.entries[-1].sparse, expected_click)
    assert bank.entries[-1].sparse.shape == (1, 48)  # pad token dropped


def test_adding_an_interaction_projects_only_the_new_memory(model, embedding):
    calls = {"sparse": 0, "dense": 0}
    ma = model.memory_attention
    ma.sparse_qkv.register_forward_hook(lambda *_: calls.__setitem__("sparse", calls["sparse"] + 1))
    ma.dense_k.register_forward_hook(lambda *_: calls.__setitem__("dense", calls["dense"] + 1))
    pts, lab = clicks(8)
    bank = model.new_memory_bank(capacity=5)
    prev = None
    with torch.no_grad():
        for t in range(8):
            before = dict(calls)
            prev = model.step(embedding, pts[:, : t + 1], lab[:, : t + 1], prev, bank=bank).low_res_logits
            new = {k: calls[k] - before[k] for k in calls}
            # t = 0 runs no attention; afterwards only the new entry is projected (plus, once, entry 0)
            assert new == (
                {"sparse": 0, "dense": 0} if t == 0 else {"sparse": 2 if t == 1 else 1, "dense": 2 if t == 1 else 1}
            )


def test_incremental_equals_recomputed_and_weight_change_invalidates(model, embedding):
    pts, lab = clicks(7)
    bank = model.new_memory_bank(capacity=4)  # with eviction
    run(model, embedding, pts, lab, bank)
    pe = model.dense_pe()
    with torch.no_grad():
        incremental = model.memory_attention(embedding, pe, bank)
        fresh = model.memory_attention(embedding, pe, MemoryBank.from_dict(bank.to_dict()))
        assert torch.allclose(incremental, fresh, atol=1e-6)
        model.memory_attention.dense_k.weight.add_(0.5)  # in-place update, as an optimizer step does
        changed = model.memory_attention(embedding, pe, bank)
        refreshed = model.memory_attention(embedding, pe, MemoryBank.from_dict(bank.to_dict()))
    assert not torch.allclose(changed, incremental)
    assert torch.allclose(changed, refreshed, atol=1e-6)


def test_evicted_memories_no_longer_matter(model, embedding):
    pts, lab = clicks(6)
    bank = model.new_memory_bank(capacity=2)
    run(model, embedding, pts, lab, bank)
    only_last_two = MemoryBank(capacity=2)
    for e in list(bank.entries):
        only_last_two.push(e.sparse, e.dense)
    with torch.no_grad():
        a = model.memory_attention(embedding, model.dense_pe(), bank)
        b = model.memory_attention(embedding, model.dense_pe(), only_last_two)
    assert torch.allclose(a, b, atol=1e-6)


def test_restored_bank_continues_identically(model, embedding):
    pts, lab = clicks(6)
    uninterrupted = run(model, embedding, pts, lab, model.new_memory_bank())
    bank = model.new_memory_bank()
    first = run(model, embedding, pts, lab, bank, upto=3)
    restored = MemoryBank.from_dict(bank.to_dict())
    prev = first[-1].low_res_logits
    with torch.no_grad():
        for t in range(3, 6):
            prev = model.step(embedding, pts[:, : t + 1], lab[:, : t + 1], prev, bank=restored).low_res_logits
    assert torch.allclose(prev, uninterrupted[-1].low_res_logits, atol=1e-5)


@pytest.mark.parametrize("variant", ["sparse", "dense", "sparse+dense"])
def test_every_variant_runs_and_differs_from_no_memory(model, embedding, variant):
    pts, lab = clicks(3)
    outs = run(model, embedding, pts, lab, model.new_memory_bank(variant=variant))
    base = run(model, embedding, pts, lab, None)
    assert outs[-1].low_res_logits.shape == (1, 1, 32, 32, 32)
    assert not torch.allclose(outs[-1].low_res_logits, base[-1].low_res_logits)


def test_decoder_sees_only_newest_click_when_configured(embedding):
    cfg = get_preset("sam-med3d-tiny")
    cfg = cfg.replace(memory=MemoryConfig(**{**cfg.memory.__dict__, "decoder_clicks": "newest"}))
    torch.manual_seed(0)
    m = build_model(cfg)
    pts, lab = clicks(3)
    prev = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = m.step(embedding, pts, lab, prev, bank=None)
        s, d = m.prompt_encoder(points=(pts[:, -1:], lab[:, -1:]), masks=prev)
        ref, _ = m.mask_decoder(embedding, m.dense_pe(), s, d, multimask_output=False)
    assert torch.equal(out.low_res_logits, ref)


def test_fresh_memory_attention_only_renormalises(embedding):
    """Zero-initialised residual branches: a new block maps E to final_norm(E), whatever the memory."""
    torch.manual_seed(0)
    m = build_model("sam-med3d-tiny")
    pts, lab = clicks(3)
    bank = m.new_memory_bank()
    run(m, embedding, pts, lab, bank)
    with torch.no_grad():
        out = m.memory_attention(embedding, m.dense_pe(), bank)
        tokens = m.memory_attention.final_norm(embedding.flatten(2).transpose(1, 2))
    assert torch.allclose(out.flatten(2).transpose(1, 2), tokens, atol=1e-6)


def test_ring_buffer_after_undo_uses_the_new_entry(model, embedding):
    """An undone interaction's cached keys/values must not stand in for the entry that replaces it."""
    pts, lab = clicks(4)
    bank = model.new_memory_bank()
    run(model, embedding, pts, lab, bank)
    saved = (list(bank.entries)[:-1], bank.total_pushed - 1)
    bank.entries.pop()  # undo the last interaction, as the session does
    bank.total_pushed -= 1
    assert [e.index for e in bank.entries] == [e.index for e in saved[0]]
    other = torch.tensor([[[5.0, 120.0, 9.0]]])
    with torch.no_grad():
        model.step(
            embedding,
            torch.cat([pts[:, :3], other], 1),
            torch.cat([lab[:, :3], torch.ones(1, 1)], 1),
            torch.randn(1, 1, 32, 32, 32),
            bank=bank,
        )
        incremental = model.memory_attention(embedding, model.dense_pe(), bank)
        fresh = model.memory_attention(embedding, model.dense_pe(), MemoryBank.from_dict(bank.to_dict()))
    assert torch.allclose(incremental, fresh, atol=1e-6)
