"""SPEC §5: CausalSelfAttention and SynthesizerAttention.

Small config (block 16, d 32, 4 heads, no dropout) in fp32. Both the fused
(scaled_dot_product_attention) path and the slow reference path are held to
causality, to each other (outputs and gradients) and, for the Synthesizer, to
a per-head, per-query loop written out here from the equation.
"""
import math

import pytest
import torch

import attention
from conftest import small_config

pytestmark = pytest.mark.usefixtures('single_thread')

BS, D, H = 16, 32, 4
VARIANTS = {'vanilla': attention.CausalSelfAttention, 'synthesizer': attention.SynthesizerAttention}


def make(variant, fused=True, seed=0, pdrop=0.0, attn_pdrop=None, resid_pdrop=None):
    torch.manual_seed(seed)
    cfg = small_config(variant == 'synthesizer', fused=fused, block_size=BS, n_embd=D, n_head=H, pdrop=pdrop)
    if attn_pdrop is not None:
        cfg.attn_pdrop = attn_pdrop
    if resid_pdrop is not None:
        cfg.resid_pdrop = resid_pdrop
    module = VARIANTS[variant](cfg)
    module.fused = fused
    if variant == 'synthesizer':
        # w2 is tiny at init; make the synthesized scores matter for the tests
        with torch.no_grad():
            module.w2.normal_(0, 0.5)
            module.b2.normal_(0, 0.5)
    return module.eval()


def inputs(B=3, T=BS - 1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('variant', VARIANTS)
def test_output_shape(variant, fused):
    m = make(variant, fused)
    for T in (1, 7, BS - 1):
        assert m(inputs(2, T)).shape == (2, T, D)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('variant', VARIANTS)
def test_causality(variant, fused):
    m = make(variant, fused)
    x = inputs()
    with torch.no_grad():
        y = m(x)
        for t in range(x.size(1) - 1):
            x2 = x.clone()
            x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 3
            y2 = m(x2)
            torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-6)
            # and the later outputs do see the change
            assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize('variant', VARIANTS)
def test_fused_equals_reference_outputs_and_gradients(variant):
    fast, slow = make(variant, True), make(variant, False)
    slow.load_state_dict(fast.state_dict())
    x = inputs()
    x_fast = x.clone().requires_grad_(True)
    x_slow = x.clone().requires_grad_(True)
    weights = torch.randn(x.shape[0], x.shape[1], D, generator=torch.Generator().manual_seed(7))
    y_fast, y_slow = fast(x_fast), slow(x_slow)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-5, atol=1e-5)
    (y_fast * weights).sum().backward()
    (y_slow * weights).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_slow.grad, rtol=1e-5, atol=1e-5)
    slow_params = dict(slow.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, f'no gradient for {name} on the fused path'
        assert slow_params[name].grad is not None, f'no gradient for {name} on the reference path'
        torch.testing.assert_close(p.grad, slow_params[name].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f'{name}: {m}')


def test_vanilla_reference_equals_equation():
    m = make('vanilla', False)
    x = inputs(2, 9)
    hs = D // H
    with torch.no_grad():
        q, k, v = m.query(x), m.key(x), m.value(x)
        out = torch.zeros_like(x)
        for b in range(x.size(0)):
            heads = []
            for i in range(H):
                sl = slice(i * hs, (i + 1) * hs)
                rows = []
                for t in range(x.size(1)):
                    scores = torch.stack([q[b, t, sl] @ k[b, j, sl] / math.sqrt(hs) for j in range(t + 1)])
                    p = torch.softmax(scores, 0)
                    rows.append(sum(p[j] * v[b, j, sl] for j in range(t + 1)))
                heads.append(torch.stack(rows))
            out[b] = m.proj(torch.cat(heads, dim=-1))
        torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-5)
        m.fused = True
        torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fused', [False, True])
def test_synthesizer_equals_slow_per_head_loop(fused):
    """softmax(ReLU(X A_i + b_1) B_i + b_2)(X V_i), causally masked, then the projection."""
    m = make('synthesizer', fused)
    x = inputs(2, BS - 1)
    T = x.size(1)
    hs = D // H
    with torch.no_grad():
        A = m.w1.weight.t()  # (d, d): X @ A + b1
        b1 = m.w1.bias
        Bmat, b2 = m.w2, m.b2   # (hs, bs-1), (bs-1,)
        V = m.value.weight.t()
        bv = m.value.bias
        out = torch.zeros_like(x)
        for b in range(x.size(0)):
            heads = []
            for i in range(H):
                cols = slice(i * hs, (i + 1) * hs)
                rows = []
                for t in range(T):
                    a_t = torch.relu(x[b, t] @ A[:, cols] + b1[cols])           # (hs,)
                    scores = torch.tensor([float(a_t @ Bmat[:, j] + b2[j]) for j in range(t + 1)])
                    p = torch.softmax(scores, 0)
                    values = x[b, :t + 1] @ V[:, cols] + bv[cols]               # (t+1, hs)
                    rows.append(p @ values)
                heads.append(torch.stack(rows))
            out[b] = torch.cat(heads, dim=-1) @ m.proj.weight.t() + m.proj.bias
        torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-5)
        # a shorter sequence uses the first T columns of w2 / entries of b2
        torch.testing.assert_close(m(x[:, :6]), out[:, :6], rtol=1e-5, atol=1e-5)


def test_synthesizer_parameters():
    cfg = small_config(True, block_size=BS, n_embd=D, n_head=H)
    torch.manual_seed(0)
    m = attention.SynthesizerAttention(cfg)
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert names == {
        'w1.weight': (D, D), 'w1.bias': (D,),
        'w2': (D // H, BS - 1), 'b2': (BS - 1,),
        'value.weight': (D, D), 'value.bias': (D,),
        'proj.weight': (D, D), 'proj.bias': (D,),
    }
    assert m.w2.abs().max() <= 0.001
    assert m.w2.max() > 0.0005 and m.w2.min() < -0.0005, 'w2 is uniform on [-0.001, 0.001]'
    assert torch.equal(m.b2, torch.zeros(BS - 1))
    assert m.mask.shape == (1, 1, BS, BS)
    assert torch.equal(m.mask[0, 0], torch.tril(torch.ones(BS, BS)))
    # the larger default config too
    big = attention.SynthesizerAttention(small_config(True, block_size=128, n_embd=256, n_head=8))
    assert big.w2.shape == (32, 127) and big.b2.shape == (127,)
    w2 = big.w2.detach()
    assert w2.abs().max() <= 0.001 and abs(float(w2.mean())) < 1e-4


def test_vanilla_parameters():
    m = attention.CausalSelfAttention(small_config(False, block_size=BS, n_embd=D, n_head=H))
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert names == {f'{k}.{w}': ((D, D) if w == 'weight' else (D,))
                     for k in ('key', 'query', 'value', 'proj') for w in ('weight', 'bias')}
    assert m.mask.shape == (1, 1, BS, BS)
    assert torch.equal(m.mask[0, 0], torch.tril(torch.ones(BS, BS)))


@pytest.mark.parametrize('fused', [True, False])
def test_synthesizer_rejects_long_sequences(fused):
    m = make('synthesizer', fused)
    m(inputs(1, BS - 1))  # block_size - 1 is fine
    with pytest.raises(ValueError) as info:
        m(inputs(1, BS))
    message = str(info.value)
    assert str(BS - 1) in message and 'block' in message.lower()
    # also when the length is reached through the cache
    cache = {}
    m(inputs(1, 10), cache)
    with pytest.raises(ValueError):
        m(inputs(1, 6), cache)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('variant', VARIANTS)
def test_kv_cache_pieces_equal_whole(variant, fused):
    m = make(variant, fused)
    x = inputs(2, BS - 1)
    with torch.no_grad():
        whole = m(x)
        for cuts in ([0, 5, 6, 15], [0, 1, 2, 3, 15], [0, 14, 15]):
            cache = {}
            pieces = [m(x[:, a:b], cache) for a, b in zip(cuts[:-1], cuts[1:])]
            torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('variant', VARIANTS)
def test_attention_dropout_train_vs_eval(variant, fused):
    m = make(variant, fused, attn_pdrop=0.5, resid_pdrop=0.0)
    ref = make(variant, fused)              # same weights (same seed), no dropout
    ref.load_state_dict(m.state_dict())
    x = inputs()
    m.train()
    torch.manual_seed(11)
    y1 = m(x)
    y2 = m(x)
    assert (y1 - y2).abs().max() > 1e-3, 'attention dropout must be active in training'
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('variant', VARIANTS)
def test_residual_dropout_train_only(variant):
    m = make(variant, True, attn_pdrop=0.0, resid_pdrop=0.5)
    x = inputs()
    m.train()
    y = m(x)
    zero_frac = float((y == 0).float().mean())
    assert 0.35 < zero_frac < 0.65
    m.eval()
    assert float((m(x) == 0).float().mean()) == 0.0
