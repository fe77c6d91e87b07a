"""The single forward pass: shapes from the layout, exact attention, logits, hooks always removed."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import timm
import torch

import explorer
from explorer import capture as capture_mod
from explorer import families
from explorer.errors import CaptureError, ImageError, InputError
from explorer.images import decode, prepare

from conftest import FAMILIES, build, random_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _input(m: explorer.LoadedModel, img: np.ndarray, input_size=None) -> torch.Tensor:
    """The normalised tensor explain() feeds the model, built here from the public helpers."""
    cfg = m.data_config
    if input_size is not None:
        from explorer.images import DataConfig
        cfg = DataConfig(tuple(input_size), cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    return prepare(decode(img).array, cfg, min_patch=max(families.patch_size(m.model))).tensor


def _all_hooks(model: torch.nn.Module) -> list[str]:
    found = []
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(mod, attr, None):
                found.append(f"{name or '<root>'}.{attr}")
    return found


def _vit_attention_from_tokens(net, tokens: np.ndarray) -> np.ndarray:
    """(L, H, T, T) recomputed from each block's input: norm1 -> qkv -> q_norm/k_norm -> softmax."""
    out = []
    with torch.inference_mode():
        for layer, blk in enumerate(net.blocks):
            x = torch.from_numpy(tokens[layer]).unsqueeze(0)  # (1, T, D): the input of block `layer`
            attn = blk.attn
            h = blk.norm1(x)
            B, T, _ = h.shape
            qkv = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            scores = (q @ k.transpose(-2, -1)) * attn.scale  # (1, H, T, T)
            out.append(scores.softmax(-1)[0].numpy())
    return np.stack(out)


def _tnt_attention_from_inputs(net, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Outer (L, H, T, T) and inner (L, N, H_in, P, P) attention recomputed from the inputs of
    attn_out / attn_in, recorded with this test's own pre-hooks in a plain forward pass."""
    seen_out, seen_in, handles = [], [], []
    for blk in net.blocks:
        handles.append(blk.attn_out.register_forward_pre_hook(lambda m, a: seen_out.append(a[0].clone())))
        handles.append(blk.attn_in.register_forward_pre_hook(lambda m, a: seen_in.append(a[0].clone())))
    try:
        with torch.inference_mode():
            net(x)
    finally:
        for h in handles:
            h.remove()

    def attn_of(mod, inp):
        B, N, _ = inp.shape
        qk = mod.qk(inp).reshape(B, N, 2, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
        return ((qk[0] @ qk[1].transpose(-2, -1)) * mod.scale).softmax(-1)

    with torch.inference_mode():
        outer = np.stack([attn_of(blk.attn_out, s)[0].numpy() for blk, s in zip(net.blocks, seen_out)])
        inner = np.stack([attn_of(blk.attn_in, s).numpy() for blk, s in zip(net.blocks, seen_in)])
    return outer, inner


# ----------------------------------------------------------------------------- per family


def test_attention_shape_and_rows(family_model, image):
    key, m = family_model
    name, kwargs, roles, patch = FAMILIES[key]
    e = explorer.explain(m, image)
    side = kwargs["img_size"] // patch
    T = len(roles) + side * side
    assert e.layout.prefix_roles == roles
    assert e.layout.grid == (side, side)
    assert e.attention.shape == (kwargs["depth"], m.facts.heads, T, T)
    assert e.attention.dtype == np.float32
    assert np.all(e.attention >= 0)
    np.testing.assert_allclose(e.attention.sum(-1), 1.0, atol=1e-5)
    assert e.tokens.shape == (kwargs["depth"] + 1, T, m.facts.width)
    assert e.final_tokens.shape == (T, m.facts.width)
    assert e.patch_embeddings.shape == (side * side, m.facts.width)
    assert e.class_tokens.shape == (kwargs["depth"] + 1, m.facts.width)
    assert e.family == m.family
    assert np.isfinite(e.tokens).all()


def test_attention_equals_independent_recomputation(family_model, image):
    key, m = family_model
    e = explorer.explain(m, image)
    if m.family == "tnt":
        outer, inner = _tnt_attention_from_inputs(m.model, _input(m, image))
        np.testing.assert_allclose(e.attention, outer, atol=1e-5)
        np.testing.assert_allclose(e.inner_attention, inner.reshape(e.inner_attention.shape), atol=1e-5)
    else:
        assert e.inner_attention is None
        np.testing.assert_allclose(e.attention, _vit_attention_from_tokens(m.model, e.tokens), atol=1e-5)


def test_tokens_are_block_inputs_and_outputs(family_model, image):
    key, m = family_model
    e = explorer.explain(m, image)
    net = m.model
    if m.family == "tnt":
        # the final norm reads the last block's patch-token output
        with torch.inference_mode():
            final = net.norm(torch.from_numpy(e.tokens[-1])).numpy()
        np.testing.assert_allclose(e.final_tokens, final, atol=1e-5)
        return
    with torch.inference_mode():
        for layer, blk in enumerate(net.blocks):
            nxt = blk(torch.from_numpy(e.tokens[layer]).unsqueeze(0))[0].numpy()
            np.testing.assert_allclose(e.tokens[layer + 1], nxt, atol=1e-4)
        np.testing.assert_allclose(e.final_tokens, net.norm(torch.from_numpy(e.tokens[-1])).numpy(), atol=1e-5)
        # patch embeddings: the patch tokens before position embedding and prefix tokens
        pe = net.patch_embed(_input(m, image))
        np.testing.assert_allclose(e.patch_embeddings, pe.flatten(1, 2)[0].numpy() if pe.ndim == 4 else pe[0].numpy(),
                                   atol=1e-5)
    if not e.layout.has_class_token:
        np.testing.assert_allclose(e.class_tokens, e.tokens[:, e.layout.num_prefix:].mean(1), atol=1e-6)
    else:
        np.testing.assert_array_equal(e.class_tokens, e.tokens[:, 0])


def test_logits_equal_plain_model(family_model, image):
    key, m = family_model
    e = explorer.explain(m, image, topk=3)
    with torch.inference_mode():
        plain = m.model(_input(m, image))[0].numpy()  # fused attention, no hooks
    assert e.logits.shape == plain.shape
    assert np.abs(e.logits - plain).max() <= 1e-5
    np.testing.assert_allclose(e.probs.sum(), 1.0, atol=1e-5)
    if m.model.num_classes == 0:  # DINOv2-style backbones: their "logits" are pooled features
        assert e.topk == []  # no made-up classes from a softmax over features
        return
    order = np.argsort(-plain)[:3]
    assert [c for c, _, _ in e.topk] == list(order)
    assert [p for _, _, p in e.topk] == pytest.approx(list(e.probs[order]), abs=1e-6)
    names = m.label_names or [f"class {i}" for i in range(plain.shape[0])]
    assert [n for _, n, _ in e.topk] == [names[i] for i in order]


def test_hooks_removed_after_explain(family_model, image):
    key, m = family_model
    assert _all_hooks(m.model) == []
    fused = [getattr(a, "fused_attn", None) for a in families.attention_modules(m.model)]
    explorer.explain(m, image)
    assert _all_hooks(m.model) == []
    assert [getattr(a, "fused_attn", None) for a in families.attention_modules(m.model)] == fused


def test_position_embeddings_in_explanation(family_model, image):
    key, m = family_model
    e = explorer.explain(m, image)
    n = e.layout.num_patches
    assert e.position_embeddings["patch"].shape == (n, m.facts.width)
    if key == "tnt":
        assert e.position_embeddings["pixel"].shape == (16, m.facts.inner["width"])


# ----------------------------------------------------------------------------- TNT inner attention


def test_tnt_inner_attention(tnt_model, image):
    e = explorer.explain(tnt_model, image)
    L = len(tnt_model.model.blocks)
    N = e.layout.num_patches
    H_in = tnt_model.facts.inner["heads"]
    P = 16  # 4 x 4 pixel tokens per 16 x 16 patch
    assert e.layout.inner_grid == (4, 4)
    assert e.inner_attention.shape == (L, N, H_in, P, P)
    np.testing.assert_allclose(e.inner_attention.sum(-1), 1.0, atol=1e-5)
    # patches are distinct, so their inner attention differs
    assert not np.allclose(e.inner_attention[0, 0], e.inner_attention[0, 5])


def test_tnt_inner_attention_per_image_in_batch(tnt_model):
    a, b = random_image(seed=1), random_image(seed=2)
    ea, eb = explorer.explain_batch(tnt_model, [a, b])
    sa, sb = explorer.explain(tnt_model, a), explorer.explain(tnt_model, b)
    np.testing.assert_allclose(ea.inner_attention, sa.inner_attention, atol=1e-5)
    np.testing.assert_allclose(eb.inner_attention, sb.inner_attention, atol=1e-5)
    assert not np.allclose(ea.inner_attention, eb.inner_attention, atol=1e-4)


# ----------------------------------------------------------------------------- failure paths


@pytest.mark.parametrize("key", ["vit", "tnt"])
def test_hooks_removed_when_forward_raises(key):
    m = build(key)
    attn = families.attention_modules(m.model)
    for a in attn:
        if hasattr(a, "fused_attn"):
            a.fused_attn = True
    with pytest.raises(CaptureError) as ei:
        capture_mod.capture(m.model, torch.randn(1, 3, 48, 48))  # built for 64 x 64
    assert ei.value.code == "forward_failed"
    assert "(1, 3, 48, 48)" in str(ei.value)
    assert _all_hooks(m.model) == []
    for a in attn:
        if hasattr(a, "fused_attn"):
            assert a.fused_attn is True
    # and the model still works afterwards
    assert explorer.explain(m, random_image()).attention.shape[0] == len(m.model.blocks)


def test_capturing_nothing_raises(vit_model, monkeypatch, image):
    from timm.layers import Attention

    decoys = [Attention(8, num_heads=2) for _ in vit_model.model.blocks]  # never run
    monkeypatch.setattr(families, "attention_modules", lambda model: decoys)
    with pytest.raises(CaptureError) as ei:
        explorer.explain(vit_model, image)
    assert ei.value.code == "nothing_captured"
    assert _all_hooks(vit_model.model) == []
    assert all(not _all_hooks(d) for d in decoys)
    assert all(d.fused_attn == Attention(8, num_heads=2).fused_attn for d in decoys)


def test_capturing_too_few_layers_raises(vit_model, monkeypatch, image):
    real = families.attention_modules(vit_model.model)
    monkeypatch.setattr(families, "attention_modules", lambda model: real[:1])
    with pytest.raises(CaptureError) as ei:
        explorer.explain(vit_model, image)
    assert ei.value.code == "nothing_captured"


def test_a_block_that_drops_tokens_raises(vit_model, monkeypatch):
    """Token states share one (B, L + 2, T, D) buffer: a block whose output has another number of
    tokens (token pruning) gets a clear error, not a broadcast or a silent copy of part of it."""
    x = _input(vit_model, random_image())
    last = vit_model.model.blocks[-1]
    forward = last.forward
    monkeypatch.setattr(last, "forward", lambda t: forward(t)[:, :-1])
    with pytest.raises(CaptureError) as ei:
        capture_mod.capture(vit_model.model, x, attention=False)
    assert ei.value.code == "nothing_captured" and "token state of shape" in str(ei.value)
    monkeypatch.undo()
    assert _all_hooks(vit_model.model) == []
    raw = capture_mod.capture(vit_model.model, x, attention=False)  # and the next capture works
    with torch.inference_mode():
        want = vit_model.model.norm(vit_model.model.blocks[-1](raw.tokens[-2]))
    np.testing.assert_allclose(raw.final_tokens.numpy(), want.numpy(), atol=1e-5)


def test_fused_path_is_detected(vit_model, monkeypatch, image):
    # if a module kept its fused path, attn_drop never sees a softmax: must raise, not return empty
    class Fused(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.attn_drop = inner, torch.nn.Dropout(0.0)

    wrapped = [Fused(a) for a in families.attention_modules(vit_model.model)]
    monkeypatch.setattr(families, "attention_modules", lambda model: wrapped)
    with pytest.raises(CaptureError):
        explorer.explain(vit_model, image)
    assert _all_hooks(vit_model.model) == []


def test_capture_without_attention_keeps_fused(vit_model):
    x = _input(vit_model, random_image())
    raw = capture_mod.capture(vit_model.model, x, attention=False)
    assert raw.attention is None and raw.inner_attention is None
    assert len(raw.tokens) == len(vit_model.model.blocks) + 1
    with torch.inference_mode():
        np.testing.assert_allclose(raw.logits.numpy(), vit_model.model(x).numpy(), atol=1e-5)
    assert _all_hooks(vit_model.model) == []


# ----------------------------------------------------------------------------- threads


def test_two_threads_one_model(vit_model):
    images = [random_image(seed=10), random_image(70, 90, seed=11)]
    expected = [explorer.explain(vit_model, im) for im in images]
    assert not np.allclose(expected[0].logits, expected[1].logits)
    barrier = threading.Barrier(3)
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []
    stop = threading.Event()

    def work(i):
        try:
            barrier.wait()
            for _ in range(6):
                results[i].append(explorer.explain(vit_model, images[i]))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def plain_forwards():  # a third thread running the model without capturing
        x = _input(vit_model, random_image(seed=12))
        barrier.wait()
        with torch.inference_mode():
            while not stop.is_set():
                vit_model.model(x)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    noise = threading.Thread(target=plain_forwards)
    for t in threads + [noise]:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    noise.join(60)
    assert not errors, errors
    for i in (0, 1):
        assert len(results[i]) == 6
        for e in results[i]:
            np.testing.assert_allclose(e.logits, expected[i].logits, atol=1e-5)
            np.testing.assert_allclose(e.attention, expected[i].attention, atol=1e-5)
            np.testing.assert_allclose(e.tokens, expected[i].tokens, atol=1e-5)
            assert e.image_size == expected[i].image_size
    assert _all_hooks(vit_model.model) == []


# ----------------------------------------------------------------------------- sizes and dtypes


@pytest.mark.parametrize("input_size", [(32, 64), (64, 32), (48, 80)])
def test_non_square_dynamic_input(input_size):
    torch.manual_seed(0)
    m = explorer.load_model("vit_tiny_patch16_224", pretrained=False, use_cache=False, img_size=64, depth=2,
                            dynamic_img_size=True)
    assert families.supports_dynamic_size(m.model)
    img = random_image(90, 120, seed=3)
    e = explorer.explain(m, img, input_size=input_size)
    rows, cols = input_size[0] // 16, input_size[1] // 16
    assert e.layout.grid == (rows, cols) and rows != cols
    T = 1 + rows * cols
    assert e.attention.shape == (2, 3, T, T)
    assert e.crop.shape == (*input_size, 3)
    np.testing.assert_allclose(e.attention.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e.attention, _vit_attention_from_tokens(m.model, e.tokens), atol=1e-5)
    with torch.inference_mode():
        plain = m.model(_input(m, img, input_size))[0].numpy()
    assert np.abs(e.logits - plain).max() <= 1e-5
    x0, y0, x1, y1 = e.box
    assert (x1 - x0) / (y1 - y0) == pytest.approx(input_size[1] / input_size[0], rel=1e-6)


def test_fixed_size_model_refuses_other_input_size(vit_model, image):
    with pytest.raises(ImageError) as ei:
        explorer.explain(vit_model, image, input_size=(32, 64))
    assert ei.value.code == "fixed_input_size"
    e = explorer.explain(vit_model, image, input_size=(64, 64))  # its own size is fine
    assert e.crop.shape == (64, 64, 3)


@pytest.mark.parametrize("key", ["vit", "reg4", "tnt"])
def test_float16_attention(key, image):
    m = build(key)
    e32 = explorer.explain(m, image, attention_dtype="float32")
    e16 = explorer.explain(m, image, attention_dtype="float16")
    assert e32.attention.dtype == np.float32 and e16.attention.dtype == np.float16
    assert np.abs(e16.attention.astype(np.float32) - e32.attention).max() <= 1e-3
    np.testing.assert_array_equal(e16.logits, e32.logits)


def test_auto_dtype_switches_above_budget(vit_model, image, monkeypatch):
    monkeypatch.setattr(capture_mod, "ATTENTION_FLOAT32_BUDGET", 100)
    assert explorer.explain(vit_model, image).attention.dtype == np.float16
    monkeypatch.setattr(capture_mod, "ATTENTION_FLOAT32_BUDGET", 10**9)
    assert explorer.explain(vit_model, image).attention.dtype == np.float32


@pytest.mark.parametrize("hw", [(80, 100), (100, 80), (64, 64), (300, 40)])
def test_crop_and_box_line_up(family_model, hw):
    key, m = family_model
    img = random_image(*hw, seed=5)
    e = explorer.explain(m, img)
    H, W = hw
    assert e.image_size == (W, H)
    assert e.crop.shape == (*m.data_config.input_size, 3) and e.crop.dtype == np.uint8
    x0, y0, x1, y1 = e.box
    assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
    assert x0 == pytest.approx(W - x1) and y0 == pytest.approx(H - y1)  # centred
    ih, iw = m.data_config.input_size
    assert (x1 - x0) / (y1 - y0) == pytest.approx(iw / ih)
    # the crop is the box's content: compare with a plain resize of the box
    from PIL import Image
    ref = np.asarray(Image.fromarray(img).resize((iw, ih), Image.BILINEAR, box=e.box), dtype=np.float32)
    assert np.abs(ref - e.crop.astype(np.float32)).mean() < 12


def test_explain_batch_matches_single(vit_model):
    imgs = [random_image(seed=s) for s in (20, 21, 22)]
    batch = explorer.explain_batch(vit_model, imgs)
    for im, eb in zip(imgs, batch):
        es = explorer.explain(vit_model, im)
        np.testing.assert_allclose(eb.logits, es.logits, atol=1e-5)
        np.testing.assert_allclose(eb.attention, es.attention, atol=1e-5)


def test_explain_accepts_raw_timm_module(image):
    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=1).eval()
    e = explorer.explain(net, image)
    assert e.layout.prefix_roles == ("cls", "dist")
    assert e.attention.shape == (1, 3, 18, 18)
    with pytest.raises(TypeError):
        explorer.explain(object(), image)


def test_explanation_nbytes(vit_model, image):
    e = explorer.explain(vit_model, image)
    assert e.nbytes() >= e.attention.nbytes + e.tokens.nbytes + e.crop.nbytes
    assert e.num_layers == 2 and e.num_heads == 3


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_summaries_kept_at_capture_equal_recomputation(family_model, image, dtype, monkeypatch):
    """The head means and attention distances made while storing each layer (block by block, here
    a row or two at a time) equal their definitions recomputed from float32 attention."""
    from explorer.analysis import RolloutOptions, rollout_matrix
    from explorer.analysis.distance import patch_distances

    key, m = family_model
    ref = explorer.explain(m, image, attention_dtype="float32")
    monkeypatch.setattr(capture_mod, "_CHUNK", 7)
    e = explorer.explain(m, image, attention_dtype=dtype)
    assert e.attention.dtype == np.dtype(dtype)
    a32 = ref.attention.astype(np.float64)
    np.testing.assert_allclose(e.head_mean, a32.mean(1), atol=1e-6)
    lay = e.layout
    p = lay.num_prefix
    pa = a32[:, :, p:, p:] / a32[:, :, p:, p:].sum(-1, keepdims=True)
    mad = np.einsum("lhqk,qk->lhq", pa, patch_distances(lay)).mean(-1)
    np.testing.assert_allclose(e.attention_distance(), mad, rtol=1e-5)
    for opts in (RolloutOptions(), RolloutOptions(start_layer=1), RolloutOptions(discard_ratio=0.5)):
        q = lay.default_query()
        full = rollout_matrix(ref.attention, opts, p)
        tol = 1e-5 if dtype == "float32" or opts.discard_ratio == 0 else 2e-3
        np.testing.assert_allclose(e.rollout_row(q, opts), full[q], atol=tol)


def test_summaries_per_image_in_a_batch(vit_model):
    imgs = [random_image(seed=s) for s in (30, 31)]
    batch = explorer.explain_batch(vit_model, imgs)
    for im, eb in zip(imgs, batch):
        es = explorer.explain(vit_model, im)
        np.testing.assert_allclose(eb.head_mean, es.head_mean, atol=1e-6)
        np.testing.assert_allclose(eb.distance, es.distance, rtol=1e-5)


@pytest.mark.parametrize("chunk", [40, None])
@pytest.mark.parametrize("key", ["vit", "reg4", "deit_distilled", "dinov2", "gap", "tnt"])
def test_blocked_attention_equals_timm_unfused_path(key, chunk, image, monkeypatch):
    """On the CPU timm's and TNT's attention are computed by our own forward, block of query rows
    by block (one-row blocks through a scratch buffer with ``chunk`` 40; whole images written
    straight into the float32 storage otherwise); everything it leaves behind equals timm's own
    unfused path under hooks, and the instance forwards are gone afterwards."""
    m = build(key)
    calls, inner_calls = [], []
    real, real_inner = capture_mod._LayerStore.attend, capture_mod._InnerStore.attend
    monkeypatch.setattr(capture_mod._LayerStore, "attend",
                        lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(capture_mod._InnerStore, "attend",
                        lambda self, *a: inner_calls.append(1) or real_inner(self, *a))
    if chunk:
        monkeypatch.setattr(capture_mod, "_CHUNK", chunk)
    x = _input(m, image)
    blocked = capture_mod.capture(m.model, x)
    assert len(calls) == len(m.model.blocks)
    assert len(inner_calls) == (len(m.model.blocks) if key == "tnt" else 0)
    hooked = capture_mod.capture(m.model, x, blocked=False)
    assert len(calls) == len(m.model.blocks)  # the hook path did not call it
    np.testing.assert_allclose(blocked.logits, hooked.logits, atol=1e-5)
    np.testing.assert_allclose(blocked.attention, hooked.attention, atol=1e-6)
    np.testing.assert_allclose(blocked.head_mean, hooked.head_mean, atol=1e-6)
    np.testing.assert_allclose(blocked.distance, hooked.distance, rtol=1e-5)
    if key == "tnt":
        assert blocked.inner_attention.shape == hooked.inner_attention.shape
        np.testing.assert_allclose(blocked.inner_attention, hooked.inner_attention, atol=1e-6)
    else:
        assert blocked.inner_attention is None and hooked.inner_attention is None
    for tb, th in zip(blocked.tokens, hooked.tokens):
        np.testing.assert_allclose(tb, th, atol=1e-5)
    mods = families.attention_modules(m.model) + families.inner_attention_modules(m.model)
    assert all("forward" not in a.__dict__ for a in mods)


@pytest.mark.parametrize("sink", [0.0, 17.0, 25.0])
def test_capture_distance_when_prefix_tokens_take_nearly_all_attention(sink):
    """Attention sinks: when the class token gets nearly all of a row, the share left on patches
    is tiny and must be summed, not taken as 1 - prefix share (which loses every digit)."""
    from explorer.analysis import mean_attention_distance
    from explorer.families import TokenLayout

    lay = TokenLayout(("cls",), (6, 6), (16, 16))
    T = lay.num_tokens
    logits = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 2, T, T)).astype(np.float32))
    logits[..., 0] += sink
    a = logits.softmax(-1)
    store = capture_mod._LayerStore(1, lay, "float32")
    store.keep(0, a)
    np.testing.assert_allclose(store.distance[0].numpy(), mean_attention_distance(a.numpy(), lay), rtol=1e-4)


def test_blocked_forward_removed_when_it_raises(image, monkeypatch):
    m = build("vit")

    def boom(self, *a):
        raise RuntimeError("boom")

    monkeypatch.setattr(capture_mod._LayerStore, "attend", boom)
    with pytest.raises(CaptureError):
        explorer.explain(m, image)
    assert all("forward" not in a.__dict__ for a in families.attention_modules(m.model))
    monkeypatch.undo()
    x = _input(m, image)
    with torch.inference_mode():
        np.testing.assert_allclose(capture_mod.capture(m.model, x).logits, m.model(x), atol=1e-5)


def test_buffer_pool_recycles_only_buffers_nobody_holds(monkeypatch):
    """Large capture buffers are handed out again once every tensor made from them is gone, never
    while an explanation still refers to them; the pool keeps at most ``keep`` arrays."""
    from explorer.buffers import BufferPool

    pool = BufferPool(keep=3)
    monkeypatch.setattr(pool, "min_bytes", 1024)
    a = pool.empty((4, 64, 64), torch.float32)
    ptr = a.data_ptr()
    view = a[1].numpy()  # as an Explanation holds it: a numpy view of one image
    a.fill_(1.0)
    del a
    b = pool.empty((4, 64, 64), torch.float32)
    assert b.data_ptr() != ptr and view.sum() == 64 * 64  # still held: a new buffer
    del view
    c = pool.empty((4, 64, 64), torch.float32)
    assert c.data_ptr() == ptr  # free again: recycled
    assert pool.empty((2, 64, 64), torch.float16).data_ptr() not in (ptr, b.data_ptr())  # other size
    assert len(pool._arrays) == pool.keep
    small = pool.empty((4, 4), torch.float32)  # below min_bytes: straight from numpy, not pooled
    assert len(pool._arrays) == pool.keep and small.shape == (4, 4)
    pool.release()  # lets go of what nobody holds, keeps what is in use
    assert len(pool._arrays) == 2 and c.data_ptr() == ptr and b.data_ptr() != ptr
    del b, c
    pool.release()
    assert pool._arrays == []


def test_capture_results_survive_the_next_capture(image):
    """Recycling never overwrites attention an explanation still holds (float16 storage, pooled)."""
    m = build("dinov2")
    x = _input(m, image)
    old_min = capture_mod._BUFFERS.min_bytes
    capture_mod._BUFFERS.min_bytes = 1
    try:
        first = capture_mod.capture(m.model, x, attention_dtype="float16")
        kept = first.attention.clone()
        second = capture_mod.capture(m.model, torch.flip(x, (-1,)), attention_dtype="float16")
        assert second.attention.data_ptr() != first.attention.data_ptr()
        assert torch.equal(first.attention, kept)
    finally:
        capture_mod._BUFFERS.min_bytes = old_min


def test_explanation_ranks_links_once_per_fusion(vit_model, image, monkeypatch):
    """A discard ratio sorts every row once per head fusion (link_ranks); moving the ratio reuses
    the ranks, at most two fusions' ranks and two fused settings are kept, and every cached answer
    equals rollout from scratch."""
    from explorer.analysis import RolloutOptions, rollout, rollout_matrix

    e = explorer.explain(vit_model, image)
    built: list[str] = []
    real = rollout.link_ranks
    monkeypatch.setattr(rollout, "link_ranks", lambda a, fusion, *args, **kw: built.append(fusion) or real(a, fusion, *args, **kw))
    q = e.layout.default_query()
    for fusion in ("mean", "max", "min", "mean"):
        for ratio in (0.0, 0.3, 0.8):
            for start in (0, 1):
                opts = RolloutOptions(head_fusion=fusion, discard_ratio=ratio, start_layer=start)
                ref = rollout_matrix(e.attention, opts, e.layout.num_prefix)[q]  # renormalised Â, full chain
                np.testing.assert_allclose(e.rollout_row(q, opts), ref, rtol=1e-6, atol=1e-8)
    assert built == ["mean", "max", "min", "mean"]  # mean's ranks were dropped for min's
    assert sum(k[0] == "ranks" for k in e.cache) == 2 and sum(k[0] == "fused" for k in e.cache) == 2


def test_discard_ratios_write_no_layers_and_keep_the_fusions(vit_model, image, monkeypatch):
    """Moving the discard slider reads the head means (or a kept fusion) and the links' ranks and
    fuses or writes no layers: the fusions kept for max and min survive any number of ratios, and
    every row, for any residual weight, still equals the full matrix chain's."""
    from explorer.analysis import RolloutOptions, rollout, rollout_matrix

    e = explorer.explain(vit_model, image)
    q, p = e.layout.default_query(), e.layout.num_prefix
    for fusion in ("max", "min"):
        e.rollout_row(q, RolloutOptions(head_fusion=fusion))
        e.link_ranks(fusion)
    e.link_ranks("mean")
    kept = {f: e.cache[("fused", f)] for f in ("max", "min")}
    settings = [RolloutOptions(head_fusion=f, discard_ratio=d, start_layer=s, residual=r)
                for d in (0.0, 0.1, 0.5, 0.9, 0.3) for f in ("mean", "max", "min")
                for s in range(e.num_layers) for r in (0.5, 0.2)]
    want = [rollout_matrix(e.attention, o, p)[q] for o in settings]  # fuses: before counting
    fusing = []
    real = rollout._fuse
    monkeypatch.setattr(rollout, "_fuse", lambda *a, **kw: fusing.append(a[1]) or real(*a, **kw))
    for o, w in zip(settings, want):
        np.testing.assert_allclose(e.rollout_row(q, o), w, rtol=1e-5, atol=1e-8)
    assert fusing == []  # nothing fused again, nothing discarded into new layers
    assert not any(key[0] == "fused" and key[1] == "mean" for key in e.cache)  # the head means serve
    assert all(e.cache[("fused", f)] is kept[f] for f in ("max", "min"))
    assert {key for key in e.cache if key[0] == "ranks"} == {("ranks", "max"), ("ranks", "min")}
    with pytest.raises(InputError):
        e.fused("median")
    assert all(e.cache[("fused", f)] is kept[f] for f in ("max", "min"))  # a bad name evicts nothing


def test_explanation_cache_keeps_what_was_used_last_and_survives_threads(vit_model, image, monkeypatch):
    """The cache evicts the setting used longest ago (not the one made first), and events of one
    session running at once on four threads neither fail nor grow it past two per kind."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from explorer.analysis import RolloutOptions, rollout, rollout_matrix

    e = explorer.explain(vit_model, image)
    built: list[str] = []
    real = rollout.link_ranks
    monkeypatch.setattr(rollout, "link_ranks", lambda a, fusion, *args, **kw: built.append(fusion) or real(a, fusion, *args, **kw))
    for fusion in ("mean", "max", "mean", "min", "mean"):
        e.rollout_row(e.layout.default_query(), RolloutOptions(head_fusion=fusion, discard_ratio=0.5))
    assert built == ["mean", "max", "min"]  # mean was used after max: max went first
    q = e.layout.default_query()
    settings = [RolloutOptions(head_fusion=f, discard_ratio=d, start_layer=s)
                for f in ("mean", "max", "min") for d in (0.0, 0.3, 0.7) for s in (0, 1)]
    want = {o: rollout_matrix(e.attention, o, e.layout.num_prefix)[q] for o in settings}
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        with ThreadPoolExecutor(4) as pool:
            rows = list(pool.map(lambda o: (o, e.rollout_row(q, o)), settings * 20))
    finally:
        sys.setswitchinterval(switch)
    for o, row in rows:
        np.testing.assert_allclose(row, want[o], rtol=1e-6, atol=1e-8)
    for kind in ("fused", "ranks"):
        assert sum(k[0] == kind for k in e.cache) <= 2
