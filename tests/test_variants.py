"""The later years' variants: RoPE (2024) and the perceiver bottleneck (2023).

RoPE is held to a rotation written as complex multiplication from the
formula, to the relative-position property and, inside attention and the
whole model, to slow references. CausalCrossAttention is held to a
per-query loop. Both models are held to causality, to their key/value-cache
decoding and to their starter code's parameter layout: a state dict with
those names and shapes loads and gives the logits of a reference forward
pass written here from the handouts' equations.
"""
import cmath
import math

import pytest
import torch
import torch.nn.functional as F

import attention
import model
import utils
from conftest import small_config

pytestmark = pytest.mark.usefixtures('single_thread')

BS, D, H = 16, 32, 4
HS = D // H


def rope_config(**kw):
    return small_config(False, block_size=BS, n_embd=D, n_head=H, rope=True, **kw)


def perceiver_config(m=6, **kw):
    return small_config(False, block_size=BS, n_embd=D, n_head=H, n_layer=4, perceiver=True, bottleneck_dim=m, **kw)


def rotate_reference(x, start=0):
    """x (..., T, hs): pair i of position t taken as the complex number x[2i] + i x[2i+1], times e^(i t theta_i)."""
    out = torch.empty_like(x)
    hs = x.size(-1)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).view(-1, x.dim() - 1).tolist():
        t = index[-1] + start
        for i in range(hs // 2):
            theta = 10000 ** (-2 * i / hs)  # 10000^(-2(i-1)/d) with i counted from 1
            z = complex(x[(*index, 2 * i)], x[(*index, 2 * i + 1)]) * cmath.exp(1j * t * theta)
            out[(*index, 2 * i)], out[(*index, 2 * i + 1)] = z.real, z.imag
    return out


# --- RoPE -------------------------------------------------------------------

def test_rotary_cache_shape_and_values():
    cache = attention.precompute_rotary_emb(8, 20)
    assert cache.shape == (20, 4, 2) and cache.dtype == torch.float32
    for t in (0, 1, 7, 19):
        for i in range(4):
            angle = t * 10000 ** (-2 * i / 8)
            assert cache[t, i, 0].item() == pytest.approx(math.cos(angle), abs=1e-7)
            assert cache[t, i, 1].item() == pytest.approx(math.sin(angle), abs=1e-7)


def test_apply_rotary_equals_complex_reference():
    x = torch.randn(2, 3, 11, HS, generator=torch.Generator().manual_seed(0))
    cache = attention.precompute_rotary_emb(HS, BS)
    torch.testing.assert_close(attention.apply_rotary_emb(x, cache), rotate_reference(x), rtol=1e-5, atol=1e-5)
    # positions start .. start + T - 1: what the key/value cache relies on
    torch.testing.assert_close(attention.apply_rotary_emb(x[:, :, 4:], cache, start=4),
                               rotate_reference(x[:, :, 4:], start=4), rtol=1e-5, atol=1e-5)
    # a rotation: lengths kept; position 0 left as it is
    torch.testing.assert_close(attention.apply_rotary_emb(x, cache).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(attention.apply_rotary_emb(x, cache)[:, :, 0], x[:, :, 0])


def test_rotary_keeps_dtype():
    x = torch.randn(1, 2, 5, HS).to(torch.bfloat16)
    assert attention.apply_rotary_emb(x, attention.precompute_rotary_emb(HS, BS)).dtype == torch.bfloat16


def test_rotary_scores_depend_only_on_offset():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(HS, generator=g), torch.randn(HS, generator=g)
    cache = attention.precompute_rotary_emb(HS, 64)

    def at(v, t):
        return attention.apply_rotary_emb(v.expand(t + 1, HS), cache)[t]

    def score(i, j):
        return (at(q, i) @ at(k, j)).item()

    for offset in (0, 1, 5, -3):
        scores = [score(j + offset, j) for j in range(3, 40, 6)]
        assert max(scores) - min(scores) < 1e-4, (offset, scores)
    assert abs(score(9, 4) - score(9, 8)) > 1e-3, 'scores must depend on the offset'


def rope_attention_reference(m, x):
    """softmax(rot(X Q) rot(X K)^T / sqrt(hs)) (X V), causal, per head, then the projection: v not rotated."""
    B, T, _ = x.shape
    q, k, v = (lin(x).view(B, T, H, HS).transpose(1, 2) for lin in (m.query, m.key, m.value))
    q, k = rotate_reference(q), rotate_reference(k)
    scores = q @ k.transpose(-2, -1) / math.sqrt(HS)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float('-inf'))
    y = torch.softmax(scores, -1) @ v
    return m.proj(y.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize('fused', [True, False])
def test_rope_attention_equals_reference(fused):
    torch.manual_seed(0)
    m = attention.CausalSelfAttention(rope_config(fused=fused)).eval()
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(m(x), rope_attention_reference(m, x), rtol=1e-5, atol=1e-5)


def test_rope_attention_fused_equals_slow_and_cache_pieces():
    torch.manual_seed(0)
    fast = attention.CausalSelfAttention(rope_config()).eval()
    slow = attention.CausalSelfAttention(rope_config(fused=False)).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(3, BS - 1, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = fast(x)
        torch.testing.assert_close(slow(x), whole, rtol=1e-5, atol=1e-5)
        for m in (fast, slow):
            cache = {}
            pieces = [m(x[:, a:b], cache) for a, b in [(0, 4), (4, 5), (5, BS - 1)]]
            torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)


def test_rope_model_layout_has_no_position_embedding():
    torch.manual_seed(0)
    m = model.GPT(rope_config())
    assert not hasattr(m, 'pos_emb')
    state = m.state_dict()
    assert 'pos_emb' not in state
    for n in range(len(m.blocks)):
        torch.testing.assert_close(state[f'blocks.{n}.attn.rope_cache'], attention.precompute_rotary_emb(HS, BS))
    plain = model.GPT(small_config(False, block_size=BS, n_embd=D, n_head=H)).state_dict()
    assert set(state) == (set(plain) - {'pos_emb'}) | {f'blocks.{n}.attn.rope_cache' for n in range(len(m.blocks))}


def test_rope_needs_even_head_size():
    with pytest.raises(AssertionError, match='even'):
        attention.CausalSelfAttention(small_config(False, block_size=BS, n_embd=12, n_head=4, rope=True))


# --- CausalCrossAttention ------------------------------------------------------

def cross(fused=True, seed=0):
    torch.manual_seed(seed)
    return attention.CausalCrossAttention(small_config(False, fused=fused, block_size=BS, n_embd=D, n_head=H)).eval()


def cross_reference(m, x_kv, x_q):
    """Per batch row, head and query i: softmax over keys j <= i of q_i . k_j / sqrt(hs), times the values."""
    B = max(x_kv.size(0), x_q.size(0))
    x_kv, x_q = x_kv.expand(B, -1, -1), x_q.expand(B, -1, -1)
    q, k, v = m.query(x_q), m.key(x_kv), m.value(x_kv)
    out = torch.zeros(B, x_q.size(1), D)
    for b in range(B):
        heads = []
        for h in range(H):
            sl = slice(h * HS, (h + 1) * HS)
            rows = []
            for i in range(x_q.size(1)):
                keys = range(min(i, x_kv.size(1) - 1) + 1)
                p = torch.softmax(torch.stack([q[b, i, sl] @ k[b, j, sl] / math.sqrt(HS) for j in keys]), 0)
                rows.append(sum(p[j] * v[b, j, sl] for j in keys))
            heads.append(torch.stack(rows))
        out[b] = m.proj(torch.cat(heads, -1))
    return out


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('Tq, Tk', [(5, 12), (12, 5), (7, 7), (1, 9)])
def test_cross_attention_equals_per_query_loop(fused, Tq, Tk):
    m = cross(fused)
    g = torch.Generator().manual_seed(4)
    x_kv, x_q = torch.randn(2, Tk, D, generator=g), torch.randn(2, Tq, D, generator=g)
    with torch.no_grad():
        y = m(x_kv, x_q)
        assert y.shape == (2, Tq, D)
        torch.testing.assert_close(y, cross_reference(m, x_kv, x_q), rtol=1e-5, atol=1e-5)


def test_cross_attention_mask_is_tril_block_cut():
    m = cross()
    assert torch.equal(m.mask, torch.tril(torch.ones(BS, BS)).view(1, 1, BS, BS))
    g = torch.Generator().manual_seed(5)
    x_kv, x_q = torch.randn(2, 12, D, generator=g), torch.randn(2, 6, D, generator=g)
    with torch.no_grad():
        y = m(x_kv, x_q)
        for i in range(5):  # query i sees keys 0..i: later keys change nothing for it, and do for later queries
            changed = x_kv.clone()
            changed[:, i + 1:] += 3 * torch.randn_like(changed[:, i + 1:])
            y2 = m(changed, x_q)
            torch.testing.assert_close(y2[:, :i + 1], y[:, :i + 1], rtol=0, atol=1e-6)
            assert (y2[:, i + 1:] - y[:, i + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize('fused', [True, False])
def test_cross_attention_batch_of_one_broadcasts(fused):
    m = cross(fused)
    g = torch.Generator().manual_seed(6)
    x_kv, x_q = torch.randn(3, 10, D, generator=g), torch.randn(1, 4, D, generator=g)
    with torch.no_grad():
        y = m(x_kv, x_q)
        assert y.shape == (3, 4, D)
        torch.testing.assert_close(y, m(x_kv, x_q.expand(3, -1, -1)), rtol=1e-6, atol=1e-6)
        y = m(x_kv[:1], torch.randn(3, 4, D, generator=g))
        assert y.shape == (3, 4, D)


def test_cross_attention_fused_equals_slow_gradients():
    fast, slow = cross(True), cross(False)
    g = torch.Generator().manual_seed(7)
    x_kv, x_q = torch.randn(2, 11, D, generator=g), torch.randn(1, 5, D, generator=g)
    grads = []
    for m in (fast, slow):
        kv, q = x_kv.clone().requires_grad_(True), x_q.clone().requires_grad_(True)
        (m(kv, q) * torch.arange(D)).sum().backward()
        grads.append([kv.grad, q.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- the perceiver ---------------------------------------------------------------

def perceiver(m=6, seed=0, **kw):
    torch.manual_seed(seed)
    return model.GPT(perceiver_config(m, **kw)).eval()


def test_perceiver_shapes():
    gpt = perceiver(m=6)
    x_input = torch.randn(3, 11, D)
    with torch.no_grad():
        y = gpt.down_block(x_input)
        assert y.shape == (3, 6, D)
        assert gpt.blocks(y).shape == (3, 6, D)
        assert gpt.up_block(y, x_input).shape == (3, 11, D)
        for T in (1, 5, 6, BS - 1, BS):
            assert gpt(torch.randint(0, 50, (2, T)))[0].shape == (2, T, 50)
    assert len(gpt.blocks) == 2 and gpt.get_block_size() == BS
    assert all(block.attn.mask.shape == (1, 1, 6, 6) for block in gpt.blocks)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('m', [1, 6, BS])
def test_perceiver_is_causal(m, fused):
    gpt = perceiver(m=m, fused=fused)
    idx = torch.randint(2, 50, (2, BS - 1), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits = gpt(idx)[0]
        for t in (0, 3, m - 1, m, BS - 3):
            if not 0 <= t < BS - 2:
                continue
            changed = idx.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 7) % 48 + 2
            other = gpt(changed)[0]
            torch.testing.assert_close(other[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-5)
            assert (other[:, t + 1:] - logits[:, t + 1:]).abs().max() > 1e-4
        # and a shorter sequence gives its positions the same logits
        torch.testing.assert_close(gpt(idx[:, :5])[0], logits[:, :5], rtol=1e-5, atol=1e-5)


def test_perceiver_cache_decoding_matches_full_forward():
    gpt = perceiver(m=6)
    idx = torch.randint(2, 50, (3, 14), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = gpt(idx)[0]
        cache = model.KVCache(len(gpt.blocks))
        pieces = [gpt(idx[:, a:b], cache=cache)[0] for a, b in [(0, 5), (5, 6), (6, 14)]]
        assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    prompts = idx[:, :4]
    assert utils.greedy_decode(gpt, prompts.tolist(), 10) == utils.sample(gpt, prompts, 10)[:, 4:].tolist()


def test_perceiver_basis_is_xavier_uniform():
    m, d = 32, 256
    gpt = model.GPT(model.GPTConfig(60, 128, n_layer=3, n_head=8, n_embd=d, perceiver=True, bottleneck_dim=m))
    C = gpt.down_block.C.detach()
    bound = math.sqrt(6 / (m * d + d))  # xavier on (1, m, d): fan_in m*d, fan_out d
    assert C.shape == (1, m, d)
    assert C.abs().max() <= bound and C.abs().max() > 0.99 * bound
    assert abs(C.std().item() - bound / math.sqrt(3)) < 0.05 * bound


@pytest.mark.parametrize('settings, message', [
    (dict(bottleneck_dim=0), 'bottleneck_dim'), (dict(bottleneck_dim=-3), 'bottleneck_dim'),
    (dict(bottleneck_dim=BS + 1), 'bottleneck_dim'), (dict(bottleneck_dim=None), 'bottleneck_dim'),
    (dict(n_layer=1), 'n_layer'), (dict(synthesizer=True), 'neither'), (dict(rope=True), 'neither')])
def test_perceiver_bad_settings(settings, message):
    config = perceiver_config()
    for k, v in settings.items():
        setattr(config, k, v)
    with pytest.raises(ValueError, match=message):
        model.GPT(config)


# --- the starter layouts, loaded and run against a reference ---------------------------

V, BSZ, L, NH, DD, M = 60, 24, 4, 4, 32, 8  # a small model in each starter's layout
HD = DD // NH


def block_names(prefix, mask, cross_attention=False):
    names = {f'{prefix}ln1.weight': (DD,), f'{prefix}ln1.bias': (DD,), f'{prefix}ln2.weight': (DD,),
             f'{prefix}ln2.bias': (DD,), f'{prefix}attn.mask': (1, 1, mask, mask),
             f'{prefix}mlp.0.weight': (4 * DD, DD), f'{prefix}mlp.0.bias': (4 * DD,),
             f'{prefix}mlp.2.weight': (DD, 4 * DD), f'{prefix}mlp.2.bias': (DD,)}
    for lin in ('key', 'query', 'value', 'proj'):
        names.update({f'{prefix}attn.{lin}.weight': (DD, DD), f'{prefix}attn.{lin}.bias': (DD,)})
    return names


def starter_layout(variant):
    """Names and shapes of a state dict saved by that year's starter code (2023 perceiver, 2024 rope)."""
    names = {'tok_emb.weight': (V, DD), 'ln_f.weight': (DD,), 'ln_f.bias': (DD,), 'head.weight': (V, DD)}
    if variant == 'perceiver':
        names['pos_emb'] = (1, BSZ, DD)
        names.update(block_names('down_block.', BSZ))
        names['down_block.C'] = (1, M, DD)
        for n in range(L - 2):
            names.update(block_names(f'blocks.{n}.', M))
        names.update(block_names('up_block.', BSZ))
    else:
        for n in range(L):
            names.update(block_names(f'blocks.{n}.', BSZ))
            names[f'blocks.{n}.attn.rope_cache'] = (BSZ, HD // 2, 2)
    return names


def starter_state(variant, seed=0):
    """A state dict in the starter layout with random weights (masks and rope cache as the starter fills them)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in starter_layout(variant).items():
        if name.endswith('attn.mask'):
            state[name] = torch.tril(torch.ones(shape[-1], shape[-1])).view(shape)
        elif name.endswith('rope_cache'):
            state[name] = torch.tensor([[[math.cos(t * 10000 ** (-2 * i / HD)), math.sin(t * 10000 ** (-2 * i / HD))]
                                         for i in range(HD // 2)] for t in range(BSZ)])
        elif name.endswith('ln1.weight') or name.endswith('ln2.weight') or name == 'ln_f.weight':
            state[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.3 * torch.randn(shape, generator=g)
    return state


def layout_model(variant):
    settings = dict(perceiver=True, bottleneck_dim=M) if variant == 'perceiver' else dict(rope=True)
    return model.GPT(model.GPTConfig(V, BSZ, n_layer=L, n_head=NH, n_embd=DD, **settings)).eval()


def reference_forward(s, idx, variant):
    """The starter's GPT written out from the handouts' equations, reading the weights from s by name."""
    def lin(x, p):
        return x @ s[p + '.weight'].T + (s[p + '.bias'] if p + '.bias' in s else 0)

    def ln(x, p):
        return F.layer_norm(x, (DD,), s[p + '.weight'], s[p + '.bias'])

    def attend(p, x_kv, x_q, rotate=False):
        B = max(x_kv.size(0), x_q.size(0))
        heads = lambda t: t.expand(B, -1, -1).reshape(B, t.size(1), NH, HD).transpose(1, 2)  # noqa: E731
        q, k, v = heads(lin(x_q, p + '.query')), heads(lin(x_kv, p + '.key')), heads(lin(x_kv, p + '.value'))
        if rotate:
            q, k = rotate_reference(q), rotate_reference(k)
        Tq, Tk = q.size(2), k.size(2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(HD)
        hidden = torch.tensor([[j > i for j in range(Tk)] for i in range(Tq)])
        y = torch.softmax(scores.masked_fill(hidden, float('-inf')), -1) @ v
        return lin(y.transpose(1, 2).reshape(B, Tq, DD), p + '.proj')

    def mlp(x, p):
        return lin(F.gelu(lin(x, p + '.mlp.0')), p + '.mlp.2')

    x = s['tok_emb.weight'][idx]
    if variant == 'perceiver':
        x_input = x + s['pos_emb'][:, :idx.size(1)]
        C = s['down_block.C']
        y = C + attend('down_block.attn', x_input, ln(C, 'down_block.ln1'))
        x = y + mlp(ln(y, 'down_block.ln2'), 'down_block')
    for n in range(L - 2 if variant == 'perceiver' else L):
        p = f'blocks.{n}'
        x = x + attend(p + '.attn', ln(x, p + '.ln1'), ln(x, p + '.ln1'), rotate=variant == 'rope')
        x = x + mlp(ln(x, p + '.ln2'), p)
    if variant == 'perceiver':
        x = x_input + attend('up_block.attn', ln(x, 'up_block.ln1'), x_input)
        x = x + mlp(ln(x, 'up_block.ln2'), 'up_block')
    return lin(ln(x, 'ln_f'), 'head')


@pytest.mark.parametrize('variant', ['perceiver', 'rope'])
def test_model_has_the_starter_layout(variant):
    got = {k: tuple(v.shape) for k, v in layout_model(variant).state_dict().items()}
    assert got == starter_layout(variant)


@pytest.mark.parametrize('variant', ['perceiver', 'rope'])
def test_starter_state_dict_loads_and_matches_reference(variant):
    gpt = layout_model(variant)
    state = starter_state(variant)
    gpt.load_state_dict(state)  # strict: every name and shape as the starter saves them
    idx = torch.randint(2, V, (3, BSZ - 1), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = reference_forward(state, idx, variant)
        torch.testing.assert_close(gpt(idx)[0], expected, rtol=1e-4, atol=1e-4)
        # greedy predictions, decoded with the cache, equal the reference's
        prompts = idx[:, :6]
        x = prompts
        for _ in range(8):
            x = torch.cat([x, reference_forward(state, x, variant)[:, -1].argmax(-1, keepdim=True)], 1)
        assert utils.greedy_decode(gpt, prompts.tolist(), 8) == x[:, 6:].tolist()


def test_vanilla_layout_unchanged_by_the_variants():
    state = model.GPT(small_config(False, block_size=BS, n_embd=D, n_head=H)).state_dict()
    assert 'pos_emb' in state
    assert not any('rope_cache' in k or k.startswith(('down_block', 'up_block')) for k in state)
