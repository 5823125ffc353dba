"""SPEC §6: GPTConfig, GPT, the parameter-file layout, the loss and the initialisation."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model
from conftest import small_config

pytestmark = pytest.mark.usefixtures('single_thread')

V, BS, L, H, D = 256, 128, 4, 8, 256


def default_model(synthesizer, seed=0):
    torch.manual_seed(seed)
    return model.GPT(model.GPTConfig(V, BS, n_layer=L, n_head=H, n_embd=D, synthesizer=synthesizer))


def expected_state_shapes(synthesizer):
    shapes = {
        'tok_emb.weight': (V, D),
        'pos_emb': (1, BS, D),
        'ln_f.weight': (D,), 'ln_f.bias': (D,),
        'head.weight': (V, D),
    }
    for n in range(L):
        block = {
            'ln1.weight': (D,), 'ln1.bias': (D,),
            'ln2.weight': (D,), 'ln2.bias': (D,),
            'attn.value.weight': (D, D), 'attn.value.bias': (D,),
            'attn.proj.weight': (D, D), 'attn.proj.bias': (D,),
            'attn.mask': (1, 1, BS, BS),
            'mlp.0.weight': (4 * D, D), 'mlp.0.bias': (4 * D,),
            'mlp.2.weight': (D, 4 * D), 'mlp.2.bias': (D,),
        }
        if synthesizer:
            block.update({
                'attn.w1.weight': (D, D), 'attn.w1.bias': (D,),
                'attn.w2': (D // H, BS - 1),
                'attn.b2': (BS - 1,),
            })
        else:
            block.update({
                'attn.key.weight': (D, D), 'attn.key.bias': (D,),
                'attn.query.weight': (D, D), 'attn.query.bias': (D,),
            })
        shapes.update({f'blocks.{n}.{k}': v for k, v in block.items()})
    return shapes


def test_config_defaults_and_kwargs():
    cfg = model.GPTConfig(11, 17, n_layer=3, foo='bar')
    assert cfg.vocab_size == 11 and cfg.block_size == 17 and cfg.n_layer == 3 and cfg.foo == 'bar'
    assert cfg.embd_pdrop == cfg.resid_pdrop == cfg.attn_pdrop == 0.1
    m = model.GPT(model.GPTConfig(11, 17, n_layer=1, n_head=2, n_embd=8))
    assert isinstance(m.blocks[0].attn, model.attention.CausalSelfAttention), 'vanilla is the default'
    assert m.get_block_size() == 17


@pytest.mark.parametrize('synthesizer', [False, True])
def test_state_dict_layout(synthesizer):
    m = default_model(synthesizer)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = expected_state_shapes(synthesizer)
    assert set(got) - set(expected) == set(), 'unexpected keys'
    assert set(expected) - set(got) == set(), 'missing keys'
    assert got == expected
    assert all(v.dtype == torch.float32 for v in m.state_dict().values())
    # submodule structure the layout comes from
    assert isinstance(m.blocks, nn.Sequential) and len(m.blocks) == L
    mlp = m.blocks[0].mlp
    assert [type(layer) for layer in mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.Dropout]
    assert m.head.bias is None
    assert isinstance(m.drop, nn.Dropout)


@pytest.mark.parametrize('synthesizer', [False, True])
def test_save_load_round_trip(tmp_path, synthesizer):
    m = default_model(synthesizer, seed=1).eval()
    path = tmp_path / 'm.params'
    torch.save(m.state_dict(), path)
    other = default_model(synthesizer, seed=2).eval()
    idx = torch.randint(0, V, (2, BS - 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = other(idx)[0]
        state = torch.load(path, weights_only=True, map_location='cpu')
        assert set(state) == set(expected_state_shapes(synthesizer))
        other.load_state_dict(state)   # strict
        a, b = m(idx)[0], other(idx)[0]
    assert not torch.equal(before, a)
    assert torch.equal(a, b)


def test_params_do_not_cross_variants(tmp_path):
    """A vanilla params file cannot silently load into a synthesizer model."""
    state = default_model(False).state_dict()
    with pytest.raises(RuntimeError):
        default_model(True).load_state_dict(state)


@pytest.mark.parametrize('synthesizer', [False, True])
def test_initialisation(synthesizer):
    m = default_model(synthesizer)
    linear_weights = []
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach()
            assert abs(float(w.std()) - 0.02) < 0.001, name
            assert abs(float(w.mean())) < 0.001, name
            linear_weights.append(w.flatten())
            if mod.bias is not None:
                assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
        elif isinstance(mod, nn.Embedding):
            assert abs(float(mod.weight.detach().std()) - 0.02) < 0.001, name
        elif isinstance(mod, nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)), name
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
    allw = torch.cat(linear_weights)
    assert abs(float(allw.std()) - 0.02) < 0.0002
    assert torch.equal(m.pos_emb, torch.zeros(1, BS, D))
    if synthesizer:
        for block in m.blocks:
            assert block.attn.w2.abs().max() <= 0.001
            assert torch.equal(block.attn.b2, torch.zeros(BS - 1))


def small_model(synthesizer, seed=0, **kw):
    torch.manual_seed(seed)
    m = model.GPT(small_config(synthesizer, block_size=32, n_embd=32, n_head=4, n_layer=2,
                               vocab_size=40, **kw))
    with torch.no_grad():   # larger weights than the init, so that outputs are far from uniform
        for name, p in m.named_parameters():
            if name.endswith('w2') or name.endswith('b2') or name == 'pos_emb':
                p.normal_(0, 0.3)
    return m.eval()


@pytest.mark.parametrize('synthesizer', [False, True])
def test_forward_is_prenorm_composition(synthesizer):
    m = small_model(synthesizer)
    with torch.no_grad():   # distinct LayerNorm parameters, so that ln1 / ln2 / ln_f cannot be swapped
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
    idx = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, loss = m(idx)
        assert loss is None
        x = m.tok_emb(idx) + m.pos_emb[:, :20]
        for block in m.blocks:
            x = x + block.attn(block.ln1(x))
            x = x + block.mlp(block.ln2(x))
        expected = m.head(m.ln_f(x))
    assert logits.shape == (2, 20, 40)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('synthesizer', [False, True])
def test_loss_ignores_pad(synthesizer):
    m = small_model(synthesizer)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 40, (3, 25), generator=g)
    targets = torch.randint(1, 40, (3, 25), generator=g)
    targets[0, :10] = 0        # leading pads, as NameDataset's y
    targets[1, 15:] = 0        # trailing pads, as CharCorruptionDataset's y
    targets[2, ::3] = 0
    with torch.no_grad():
        logits, loss = m(idx, targets)
        keep = targets != 0
        manual = F.cross_entropy(logits[keep], targets[keep])
        torch.testing.assert_close(loss, manual, rtol=1e-6, atol=1e-6)
        # a pad target contributes nothing: changing the other targets to pad at those
        # positions only is the same as dropping those positions
        all_pad_row = targets.clone()
        all_pad_row[1] = 0
        _, loss2 = m(idx, all_pad_row)
        keep2 = all_pad_row != 0
        torch.testing.assert_close(loss2, F.cross_entropy(logits[keep2], all_pad_row[keep2]),
                                   rtol=1e-6, atol=1e-6)
        assert not torch.isclose(loss, loss2)
        # inputs after the last non-pad target of a row do not change the loss
        idx3 = idx.clone()
        idx3[1, 16:] = (idx3[1, 16:] + 7) % 40
        _, loss3 = m(idx3, targets)
        torch.testing.assert_close(loss3, loss, rtol=1e-6, atol=1e-6)
        # the loss of the plain mean counts every non-pad target, not the padded ones
        full = F.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1))
        assert not torch.isclose(full, loss)


@pytest.mark.parametrize('synthesizer', [False, True])
def test_loss_reduction_sum(synthesizer):
    m = small_model(synthesizer)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 40, (4, 31), generator=g)
    targets = torch.randint(0, 40, (4, 31), generator=g)
    with torch.no_grad():
        _, mean = m(idx, targets)
        _, total = m(idx, targets, loss_reduction='sum')
    count = int((targets != 0).sum())
    torch.testing.assert_close(total, mean * count, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('synthesizer', [False, True])
def test_kv_cache_matches_full_forward(synthesizer):
    m = small_model(synthesizer)
    idx = torch.randint(0, 40, (3, 31), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full, _ = m(idx)
        cache = model.KVCache(len(m.blocks))
        pieces = []
        for a, b in [(0, 9), (9, 10), (10, 11), (11, 31)]:
            pieces.append(m(idx[:, a:b], cache=cache)[0])
            assert cache.length == b
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_block_is_an_error():
    m = small_model(False)
    with pytest.raises(ValueError):
        m(torch.zeros(1, 33, dtype=torch.long))
    cache = model.KVCache(len(m.blocks))
    m(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError):
        m(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_embedding_dropout_in_training_only():
    m = small_model(False, pdrop=0.0)
    m.drop.p = 0.5
    idx = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(8))
    m.train()
    a, b = m(idx)[0], m(idx)[0]
    assert (a - b).abs().max() > 1e-3
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])
