"""Analyses against analytic cases and independent naive implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from explorer.analysis import (RolloutOptions, conv_mean_distance, conv_receptive_field, inner_map,
                               mass_on, mean_attention_distance, neighbour_structure, patch_map,
                               prefix_share, query_maps, rollout_matrix, rollout_row, similarity_tiles,
                               sincos_1d, sincos_2d, token_norms)
from explorer.analysis.distance import patch_distances, uniform_distance
from explorer.analysis.embeddings import check_count, silhouette, tsne_2d
from explorer.analysis.posembed import cosine_similarity
from explorer.errors import InputError
from explorer.families import TokenLayout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_attention(L=3, H=4, T=10, seed=0, sharp=2.0) -> np.ndarray:
    """Softmax rows of random scores. (L, H, T, T)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0, sharp, (L, H, T, T))
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- rollout


def test_rollout_of_identity_is_identity():
    L, H, T = 4, 3, 7
    eye = np.broadcast_to(np.eye(T, dtype=np.float32), (L, H, T, T)).copy()
    for q in range(T):
        row = rollout_row(eye, q)
        expected = np.zeros(T, np.float32)
        expected[q] = 1
        np.testing.assert_allclose(row, expected, atol=1e-7)
    np.testing.assert_allclose(rollout_matrix(eye), np.eye(T), atol=1e-7)


OPTS = [RolloutOptions(head_fusion=f, discard_ratio=d, start_layer=s)
        for f in ("mean", "max", "min") for d in (0.0, 0.3, 0.9) for s in (0, 1, 3)]


@pytest.mark.parametrize("opts", OPTS, ids=lambda o: f"{o.head_fusion}-d{o.discard_ratio}-s{o.start_layer}")
@pytest.mark.parametrize("num_prefix", [0, 1, 5])
def test_rollout_row_equals_matrix_row(opts, num_prefix):
    att = random_attention(L=4, H=3, T=12, seed=int(opts.discard_ratio * 10) + opts.start_layer)
    full = rollout_matrix(att, opts, num_prefix)
    for q in (0, 5, 11):
        np.testing.assert_allclose(rollout_row(att, q, opts, num_prefix), full[q], atol=1e-5)
    np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-5)  # still a flow: rows sum to 1
    assert np.all(full >= 0)


def naive_abnar_zuidema(att: np.ndarray, start: int = 0, discard: float = 0.0, num_prefix: int = 1,
                        residual: float = 0.5) -> np.ndarray:
    """Abnar & Zuidema (2020), eq. for rollout, with explicit loops:

    Â_l = (1 - r)·mean_h(A_l) + r·I, rows renormalised;  Ã = Â_L · Â_{L-1} · … · Â_start.
    (Discard: per row, zero the k = floor(N·discard) smallest links to patch tokens.)
    """
    L, H, T, _ = att.shape
    result = None
    for layer in range(start, L):
        a = [[sum(float(att[layer, h, i, j]) for h in range(H)) / H for j in range(T)] for i in range(T)]
        if discard > 0:
            n_patch = T - num_prefix
            k = int(n_patch * discard)
            for i in range(T):
                cols = sorted(range(num_prefix, T), key=lambda j: a[i][j])[:k]
                for j in cols:
                    a[i][j] = 0.0
        for i in range(T):
            for j in range(T):
                a[i][j] = (1 - residual) * a[i][j] + (residual if i == j else 0.0)
            s = sum(a[i])
            a[i] = [v / s for v in a[i]]
        if result is None:
            result = a
        else:  # Ã_l = Â_l · Ã_{l-1}
            result = [[sum(a[i][m] * result[m][j] for m in range(T)) for j in range(T)] for i in range(T)]
    return np.array(result)


@pytest.mark.parametrize("start", [0, 2])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_matches_naive_paper_formula(start, discard):
    att = random_attention(L=4, H=3, T=9, seed=7)
    opts = RolloutOptions(discard_ratio=discard, start_layer=start)
    ref = naive_abnar_zuidema(att, start, discard, num_prefix=1)
    np.testing.assert_allclose(rollout_matrix(att, opts, 1), ref, atol=1e-5)
    for q in range(9):
        np.testing.assert_allclose(rollout_row(att, q, opts, 1), ref[q], atol=1e-5)


def test_rollout_residual_weight():
    att = random_attention(L=2, H=2, T=6, seed=3)
    np.testing.assert_allclose(rollout_matrix(att, RolloutOptions(residual=0.0)),
                               att[1].mean(0) @ att[0].mean(0), atol=1e-5)
    np.testing.assert_allclose(rollout_matrix(att, RolloutOptions(residual=1.0)), np.eye(6), atol=1e-6)



@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("chunk", [1, 40, 1 << 19], ids=["row-by-row", "blocks", "whole"])
def test_mean_row_streamed_in_blocks_equals_paper_formula(monkeypatch, dtype, chunk):
    """The head-mean fast path reads the stored attention block by block (float16 converted per
    block) and skips rows it does not need: same row as the paper's loops, at any block size."""
    from explorer.analysis import rollout

    monkeypatch.setattr(rollout, "_CHUNK", chunk)
    att = random_attention(L=4, H=3, T=13, seed=11).astype(dtype)
    for start in (0, 2):
        ref = naive_abnar_zuidema(att.astype(np.float64), start=start)
        for q in (0, 6, 12):
            row = rollout_row(att, q, RolloutOptions(start_layer=start), 1)
            np.testing.assert_allclose(row, ref[q], atol=1e-6)


def _discard_equals_a_stable_sort(x: np.ndarray, ks) -> None:
    """discard_weakest zeroes, row by row, the k entries a stable sort puts first."""
    import torch

    from explorer.analysis.rollout import discard_weakest

    for k in ks:
        ours = torch.from_numpy(x.copy())
        discard_weakest(ours, k)
        order = np.argsort(x, axis=-1, kind="stable")[..., :k]
        ref = x.copy()
        np.put_along_axis(ref, order, 0.0, axis=-1)
        np.testing.assert_array_equal(ours.numpy(), ref)


def test_discard_by_selection_equals_discard_by_sorting():
    """Selection (ours) zeroes the same links as a full sort would, row by row."""
    _discard_equals_a_stable_sort(np.random.default_rng(4).random((3, 9, 17)).astype(np.float32), (1, 8, 16))


def test_discard_with_nonzero_ties_drops_exactly_k():
    import torch

    from explorer.analysis.rollout import discard_weakest

    row = torch.tensor([[0.5, 0.2, 0.2, 0.2, 0.9, 0.1, 0.2]])
    discard_weakest(row, 3)  # 0.1 and two of the four 0.2s
    assert int((row == 0).sum()) == 3
    assert row[0, 5] == 0 and row[0, 0] == 0.5 and row[0, 4] == 0.9
    assert int((row == 0.2).sum()) == 2

@pytest.mark.parametrize("num_prefix", [1, 2, 5])
def test_discard_never_zeroes_prefix_columns(num_prefix):
    from explorer.analysis.rollout import fuse

    T = num_prefix + 16
    att = random_attention(L=1, H=2, T=T, seed=num_prefix)
    att[..., :num_prefix] *= 1e-4  # prefix links are the weakest of all
    att /= att.sum(-1, keepdims=True)
    opts = RolloutOptions(discard_ratio=0.9, residual=0.0)
    f = fuse(att[0], opts, num_prefix)
    assert np.all(f[:, :num_prefix] > 0)
    # exactly floor(16 * 0.9) = 14 of the 16 patch links are gone in every row
    assert np.all((f[:, num_prefix:] == 0).sum(1) == 14)


def test_discard_with_ties_drops_exactly_the_share():
    from explorer.analysis.rollout import fuse

    T = 1 + 10
    att = np.full((1, 1, T, T), 1.0 / T, np.float32)  # every link ties
    f = fuse(att[0], RolloutOptions(discard_ratio=0.3, residual=0.0), 1)
    assert np.all((f[:, 1:] == 0).sum(1) == 3)


def test_rollout_input_checks():
    att = random_attention(L=2, T=5)
    with pytest.raises(InputError) as ei:
        rollout_row(att, 5)
    assert ei.value.code == "bad_query"
    with pytest.raises(InputError) as ei:
        rollout_row(att, 0, RolloutOptions(start_layer=2))
    assert ei.value.code == "bad_layer"
    with pytest.raises(InputError) as ei:
        rollout_row(att, 0, RolloutOptions(discard_ratio=1.0))
    assert ei.value.code == "bad_option"
    with pytest.raises(InputError) as ei:
        rollout_row(att, 0, RolloutOptions(head_fusion="median"))
    assert ei.value.code == "bad_option"
    with pytest.raises(InputError) as ei:
        rollout_matrix(att[0])
    assert ei.value.code == "bad_shape"


def test_patch_map_and_mass_on():
    row = np.array([0.5, 0.1, 0.2, 0.3, 0.4], np.float32)  # 1 prefix + 2x2 patches
    m = patch_map(row, 1, (2, 2))
    np.testing.assert_allclose(m, np.array([[0.1, 0.2], [0.3, 0.4]]), atol=1e-6)
    mask = np.array([[False, False], [False, True]])
    res = mass_on(mask, m)
    assert res["mass"] == pytest.approx(0.4) and res["area"] == 0.25
    assert res["ratio"] == pytest.approx(1.6) and res["max_on_object"] is True
    np.testing.assert_array_equal(patch_map(np.zeros(5, np.float32), 1, (2, 2)), np.zeros((2, 2)))


# ----------------------------------------------------------------------------- attention distance


def _one_hot_offset_attention(layout: TokenLayout, offsets, prefix_mass: float = 0.0) -> np.ndarray:
    """(1, H, T, T): head h sends every patch query to the patch offsets[h] = (dr, dc) away; where
    that does not exist, the offset is mirrored on that axis (±dr, ±dc: the same distance).
    Prefix tokens get prefix_mass."""
    rows, cols = layout.grid
    p, T = layout.num_prefix, layout.num_tokens
    a = np.zeros((1, len(offsets), T, T), np.float32)
    for h, (dr, dc) in enumerate(offsets):
        for r in range(rows):
            for c in range(cols):
                q = layout.token_of_patch(r, c)
                tr = r + dr if 0 <= r + dr < rows else r - dr  # mirror each axis at the border
                tc = c + dc if 0 <= c + dc < cols else c - dc
                assert 0 <= tr < rows and 0 <= tc < cols
                a[0, h, q, layout.token_of_patch(tr, tc)] = 1.0 - prefix_mass
                if p:
                    a[0, h, q, :p] = prefix_mass / p
        for q in range(p):  # prefix queries do not count; give them something valid
            a[0, h, q, :] = 1.0 / T
    return a


@pytest.mark.parametrize("layout", [
    TokenLayout(("cls",), (6, 6), (16, 16)),
    TokenLayout(("cls", "reg", "reg"), (5, 7), (14, 14)),
    TokenLayout((), (6, 5), (16, 16)),
], ids=["cls-6x6", "reg-5x7", "gap-6x5"])
@pytest.mark.parametrize("prefix_mass", [0.0, 0.4])
def test_mad_of_one_hot_offsets(layout, prefix_mass):
    offsets = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (0, 2)]
    if not layout.num_prefix:
        prefix_mass = 0.0
    att = _one_hot_offset_attention(layout, offsets, prefix_mass)
    mad = mean_attention_distance(att, layout)
    assert mad.shape == (1, len(offsets))
    ps = layout.patch_size[0]
    expected = [ps * math.sqrt(dr * dr + dc * dc) for dr, dc in offsets]
    np.testing.assert_allclose(mad[0], expected, rtol=1e-5, atol=1e-4)


def test_mad_non_square_patches():
    layout = TokenLayout(("cls",), (4, 4), (8, 16))  # 8 pixels tall, 16 wide
    att = _one_hot_offset_attention(layout, [(1, 0), (0, 1), (1, 1)])
    np.testing.assert_allclose(mean_attention_distance(att, layout)[0], [8, 16, math.hypot(8, 16)], rtol=1e-5)


@pytest.mark.parametrize("grid", [(4, 4), (3, 6)])
def test_mad_of_uniform_attention(grid):
    layout = TokenLayout(("cls",), grid, (16, 16))
    T, N = layout.num_tokens, layout.num_patches
    att = np.zeros((2, 3, T, T), np.float32)
    att[..., 1:] = 1.0 / N
    att[..., 0, :] = 1.0 / T
    centres = [((r + 0.5) * 16, (c + 0.5) * 16) for r in range(grid[0]) for c in range(grid[1])]
    total = 0.0
    for yq, xq in centres:
        for yk, xk in centres:
            total += math.hypot(yq - yk, xq - xk)
    brute = total / (N * N)
    mad = mean_attention_distance(att, layout)
    np.testing.assert_allclose(mad, brute, rtol=1e-5)
    assert uniform_distance(layout) == pytest.approx(brute, rel=1e-9)
    assert patch_distances(layout).shape == (N, N)



@pytest.mark.parametrize("chunk", [1, 50, 1 << 19], ids=["row-by-row", "blocks", "whole"])
def test_mad_in_blocks_and_float16_equals_einsum(monkeypatch, chunk):
    """The block-wise float32 computation against one numpy einsum in float64 over the whole array,
    from float32 and from float16 storage."""
    from explorer.analysis import distance

    monkeypatch.setattr(distance, "_CHUNK", chunk)
    layout = TokenLayout(("cls", "reg"), (4, 5), (16, 16))
    att = random_attention(L=2, H=3, T=layout.num_tokens, seed=8)
    for stored in (att, att.astype(np.float16)):
        a = stored.astype(np.float64)[:, :, 2:, 2:]
        a = a / a.sum(-1, keepdims=True)
        ref = np.einsum("lhqk,qk->lhq", a, patch_distances(layout)).mean(-1)
        np.testing.assert_allclose(mean_attention_distance(stored, layout), ref, rtol=1e-5)

def test_conv_receptive_field_and_distance():
    np.testing.assert_array_equal(conv_receptive_field(4), [3, 5, 7, 9])
    np.testing.assert_array_equal(conv_receptive_field(3, kernel=5), [5, 9, 13])
    d = conv_mean_distance(2)
    assert d[0] == pytest.approx((4 * 1 + 4 * math.sqrt(2)) / 9)
    r = range(-2, 3)
    assert d[1] == pytest.approx(sum(math.hypot(y, x) for y in r for x in r) / 25)


# ----------------------------------------------------------------------------- position embeddings


@pytest.mark.parametrize("grid", [(6, 6), (4, 7)])
@pytest.mark.parametrize("kind", ["2d", "1d"])
def test_sincos_similarity_tiles(grid, kind):
    rows, cols = grid
    pos = sincos_2d(grid, 64) if kind == "2d" else sincos_1d(rows * cols, 64)
    assert pos.shape == (rows * cols, 64)
    tiles = similarity_tiles(pos, grid)
    assert tiles.shape == (rows, cols, rows, cols)
    flat = tiles.reshape(rows * cols, rows * cols)
    np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-5)
    np.testing.assert_allclose(flat, flat.T, atol=1e-6)
    for r in range(rows):
        for c in range(cols):
            t = tiles[r, c]
            assert np.unravel_index(np.argmax(t), t.shape) == (r, c)
            others = np.delete(t.ravel(), r * cols + c)
            assert others.max() < 1 - 1e-4  # a strict peak


def test_sincos_1d_formula():
    pos = sincos_1d(5, 8)
    for p in range(5):
        for i in range(4):
            w = 1.0 / 10000 ** (i / 4)
            assert pos[p, 2 * i] == pytest.approx(math.sin(p * w), abs=1e-6)
            assert pos[p, 2 * i + 1] == pytest.approx(math.cos(p * w), abs=1e-6)


def test_similarity_tiles_rejects_wrong_grid():
    with pytest.raises(ValueError):
        similarity_tiles(np.zeros((10, 4)), (3, 3))


def test_cosine_similarity_matches_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))
    sim = cosine_similarity(x)
    for i in range(7):
        for j in range(7):
            ref = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
            assert sim[i, j] == pytest.approx(ref, abs=1e-6)


def _brute_chance(rows, cols):
    shares = []
    for r in range(rows):
        for c in range(cols):
            nb = sum(1 for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr or dc)
                     and 0 <= r + dr < rows and 0 <= c + dc < cols)
            shares.append(nb / (rows * cols - 1))
    return float(np.mean(shares))


def test_neighbour_structure_sincos_vs_random():
    grid = (8, 8)
    s2 = neighbour_structure(sincos_2d(grid, 128), grid)
    assert s2["total"] == 64
    assert s2["share"] >= 0.95 and s2["count"] == round(s2["share"] * 64)
    assert s2["chance"] == pytest.approx(_brute_chance(*grid))
    rng = np.random.default_rng(0)
    shares = [neighbour_structure(rng.normal(size=(64, 128)), grid)["share"] for _ in range(40)]
    assert abs(float(np.mean(shares)) - s2["chance"]) < 0.04  # about chance (~0.104)
    assert max(shares) < 0.5


# ----------------------------------------------------------------------------- maps


def test_query_maps_are_raw_entries():
    layout = TokenLayout(("cls", "dist"), (3, 4), (16, 16))
    att = random_attention(L=2, H=3, T=layout.num_tokens, seed=5)
    for q in (0, 1, 7, layout.num_tokens - 1):
        maps = query_maps(att, q, layout)
        assert maps.shape == (2, 3, 3, 4)
        for l in range(2):
            for h in range(3):
                for r in range(3):
                    for c in range(4):
                        assert maps[l, h, r, c] == att[l, h, q, layout.token_of_patch(r, c)]
        np.testing.assert_allclose(maps.sum((-1, -2)) + prefix_share(att, q, 2), 1.0, atol=1e-5)
    with pytest.raises(InputError) as ei:
        query_maps(att, layout.num_tokens, layout)
    assert ei.value.code == "bad_query"


def test_inner_map():
    rng = np.random.default_rng(0)
    inner = rng.random((2, 5, 3, 16, 16)).astype(np.float32)  # (L, N, H_in, P, P)
    m = inner_map(inner, patch=4, layer=1, head=2, query=7)
    np.testing.assert_allclose(m, inner[1, 4, 2, 7].reshape(4, 4))
    m = inner_map(inner, patch=4, layer=1)
    np.testing.assert_allclose(m, inner[1, 4].mean(0).mean(0).reshape(4, 4), atol=1e-6)
    # a 16×8 patch holds 4×2 words, row-major (timm's PixelEmbed keeps the patch's shape)
    tall = rng.random((1, 2, 2, 8, 8)).astype(np.float32)
    m = inner_map(tall, patch=1, layer=0, patch_size=(16, 8))
    np.testing.assert_allclose(m, tall[0, 1].mean(0).mean(0).reshape(4, 2), atol=1e-6)


@pytest.mark.parametrize("words, patch, grid", [(16, (16, 16), (4, 4)), (8, (16, 8), (4, 2)), (8, (8, 16), (2, 4)),
                                                (12, (16, 12), (4, 3)), (64, None, (8, 8)), (1, (16, 16), (1, 1)),
                                                (7, (16, 16), (1, 7))])
def test_word_grid_keeps_the_patch_shape(words, patch, grid):
    from explorer.analysis import word_grid

    assert word_grid(words, patch) == grid


def test_token_norms_equals_numpy():
    tokens = np.random.default_rng(1).normal(size=(3, 17, 32)).astype(np.float32)
    np.testing.assert_allclose(token_norms(tokens), np.linalg.norm(tokens, axis=-1), rtol=1e-6)
    assert token_norms(tokens).shape == (3, 17)


# ----------------------------------------------------------------------------- embeddings


def test_tsne_guards():
    with pytest.raises(InputError) as ei:
        tsne_2d(np.zeros((4, 8)))
    assert ei.value.code == "too_few_images"
    with pytest.raises(InputError) as ei:
        check_count(2001)
    assert ei.value.code == "too_many_images"


@pytest.mark.parametrize("n", range(5, 11))
def test_tsne_small_n(n):
    x = np.random.default_rng(n).normal(size=(n, 64))
    y = tsne_2d(x, perplexity=30.0)  # perplexity must be capped below n
    assert y.shape == (n, 2) and y.dtype == np.float32
    assert np.isfinite(y).all()


def test_tsne_separates_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 20))
    x = np.concatenate([c + rng.normal(0, 0.3, (10, 20)) for c in centres])
    y = tsne_2d(x, perplexity=5)
    labels = np.repeat([0, 1, 2], 10)
    assert silhouette(y, labels) is not None
    from sklearn.metrics import silhouette_score
    assert silhouette_score(y, labels) > 0.7



def test_tsne_of_many_points_keeps_neighbourhoods():
    """The shorter schedule above 500 points still keeps each point's neighbours (trustworthiness,
    Venna & Kaski) and its clusters apart."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (10, 256))
    labels = rng.integers(0, 10, 600)
    x = (centres[labels] + rng.normal(0, 0.8, (600, 256))).astype(np.float32)
    y = tsne_2d(x)
    assert trustworthiness(PCA(50, random_state=0).fit_transform(x), y, n_neighbors=10) > 0.95
    assert silhouette_score(y, labels) > 0.5

def test_silhouette():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.eye(3)[i] * 10 + rng.normal(0, 0.05, (8, 3)) for i in range(3)])
    labels = np.repeat(["a", "b", "c"], 8)
    s = silhouette(x, labels)
    assert s is not None and s > 0.95
    assert silhouette(x, ["a"] * 24) is None
    assert silhouette(x[:3], ["a", "b", "c"]) is None  # one point per label: undefined


def test_reference_tiles_are_the_sincos_similarities_kept_read_only():
    from explorer.analysis import posembed

    grid = (5, 7)
    for kind, pos in (("1d", posembed.sincos_1d(35, 32)), ("2d", posembed.sincos_2d(grid, 32))):
        kept = posembed.reference_tiles(kind, 35, 32, grid)
        np.testing.assert_array_equal(kept, posembed.similarity_tiles(pos, grid))
        assert posembed.reference_tiles(kind, 35, 32, grid) is kept and not kept.flags.writeable


def test_neighbour_structure_from_a_similarity_the_caller_has():
    from explorer.analysis import posembed

    pos = np.random.default_rng(3).normal(size=(20, 16)).astype(np.float32)
    own = posembed.neighbour_structure(pos, (4, 5))
    assert posembed.neighbour_structure(pos, (4, 5), sim=posembed.similarity_tiles(pos, (4, 5))) == own


@pytest.mark.parametrize("shape", [(3, 9, 17), (2, 2100, 40)])  # the second takes the two-thread path
def test_discard_with_many_ties_equals_a_stable_sort(shape):
    """Links from float16 attention tie at the k-th value in most rows: exactly k go, the first
    ones by index among the tied (what a stable sort would drop); negative values keep their order."""
    rng = np.random.default_rng(7)
    x = (np.round(rng.random(shape) * 6) / 6).astype(np.float16).astype(np.float32)  # 7 levels: ties
    x[0, 0, :5] = [-0.5, -0.25, -0.5, 0.0, -1.0]
    _discard_equals_a_stable_sort(x, (1, shape[-1] // 2, shape[-1] - 1))


def test_discard_with_some_tied_rows_in_many_blocks_equals_a_stable_sort():
    """A minority of rows tie (most are selected by value, the tied ones on keys), spread over
    many blocks of rows and both threads."""
    rng = np.random.default_rng(11)
    x = rng.random((3, 1500, 50)).astype(np.float32)
    tied = rng.random((3, 1500)) < 0.1
    x[tied] = np.round(x[tied] * 4) / 4  # 5 levels: these rows tie at the k-th value
    _discard_equals_a_stable_sort(x, (1, 25, 49))


def test_fused_layers_recycle_only_buffers_nobody_holds():
    """Fused layers come from a pool (a slider setting at 1370 tokens fills 86 MB): a result that
    is still held is never overwritten by the next setting, and one that was let go is reused."""
    from explorer.analysis.rollout import fused_layers

    att = random_attention(L=3, H=2, T=300, seed=5)  # 1.1 MB of fused layers: pooled
    first = fused_layers(att, RolloutOptions(head_fusion="max"), 1)
    kept = first.copy()
    second = fused_layers(att, RolloutOptions(head_fusion="min"), 1)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)
    address = first.__array_interface__["data"][0]
    del first
    third = fused_layers(att, RolloutOptions(head_fusion="mean"), 1)
    assert third.__array_interface__["data"][0] == address  # the let-go buffer, no fresh pages
    np.testing.assert_allclose(third.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(fused_layers(att, RolloutOptions(head_fusion="max"), 1), kept)


def _ties_and_all_fusions(T: int, seed: int):
    """float16 attention (max and min fusions tie at the k-th value in most rows), its float32
    head means, and a copy with some negative weights (not from a softmax)."""
    att = random_attention(L=3, H=3, T=T, seed=seed).astype(np.float16)
    head_mean = random_attention(L=3, H=3, T=T, seed=seed).mean(1)
    negative = att.copy()
    negative[1, :, :5, :7] *= -1
    return att, head_mean, negative


@pytest.mark.parametrize("num_prefix", [1, 5])
def test_ranked_discard_equals_selection_and_a_stable_sort(num_prefix):
    """fused_layers with link_ranks (one comparison per link) gives bit for bit what the selection
    in every row gives, for every fusion, ratio and start layer, with and without head means,
    ties in float16 and negative weights; and zeroes the links a stable sort of the fused row puts
    first."""
    from explorer.analysis.rollout import _fuse_heads, fused_layers, link_ranks

    att, head_mean, negative = _ties_and_all_fusions(T=num_prefix + 60, seed=num_prefix)
    for a in (att, negative):
        for fusion in ("mean", "max", "min"):
            for hm in (None, head_mean):
                ranks = link_ranks(a, fusion, num_prefix, head_mean=hm)
                assert ranks.dtype == np.int16 and ranks.shape == (3, a.shape[-1], a.shape[-1])
                assert (ranks[:, :, :num_prefix] == np.iinfo(np.int16).max).all()
                # each row of the patch columns is a permutation: the order of a stable sort
                import torch
                for layer in range(3):
                    vals = torch.empty(a.shape[-2:], dtype=torch.float32)
                    _fuse_heads(torch.from_numpy(a[layer]), fusion, vals,
                                None if hm is None else torch.from_numpy(hm[layer]))
                    order = np.argsort(vals.numpy()[:, num_prefix:], axis=-1, kind="stable")
                    np.testing.assert_array_equal(np.argsort(ranks[layer, :, num_prefix:], axis=-1), order)
                for ratio in (0.0, 0.1, 0.5, 0.97):
                    for start in (0, 2):
                        opts = RolloutOptions(head_fusion=fusion, discard_ratio=ratio, start_layer=start)
                        plain = fused_layers(a, opts, num_prefix, head_mean=hm).copy()
                        ranked = fused_layers(a, opts, num_prefix, head_mean=hm, ranks=ranks)
                        np.testing.assert_array_equal(ranked, plain)


@pytest.mark.parametrize("T, num_prefix", [(61, 1), (1030, 5)], ids=["one-thread", "two-threads"])
def test_ranked_rollout_row_equals_discarding_then_multiplying(T, num_prefix):
    """ranked_rollout_row (mask, sum and multiply a block of rows at a time, nothing written;
    from 1024 tokens rows on two threads) gives the row the fused, discarded and renormalised
    layers give (selection in every row, no ranks), for every fusion, ratio, start layer and
    query, including queries among the prefix tokens and the last row."""
    from explorer.analysis.rollout import fused_sums, link_ranks, ranked_rollout_row

    att = random_attention(L=3, H=2, T=T, seed=T)
    for fusion in ("mean", "max", "min"):
        layers, _ = fused_sums(att, RolloutOptions(head_fusion=fusion), num_prefix)
        ranks = link_ranks(att, fusion, num_prefix)
        for ratio in (0.2, 0.9):
            k = int((T - num_prefix) * ratio)
            for start, residual in ((0, 0.5), (2, 0.5), (1, 0.2)):
                opts = RolloutOptions(head_fusion=fusion, discard_ratio=ratio, start_layer=start, residual=residual)
                for q in (0, num_prefix, T - 1):
                    want = rollout_row(att, q, opts, num_prefix)
                    got = ranked_rollout_row(layers[start:], ranks[start:], k, q, opts.residual)
                    assert got.dtype == np.float32 and got.shape == (T,)
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)  # float32 sums of 1030
    with pytest.raises(ValueError):
        ranked_rollout_row(layers, ranks[1:], 1, 0)
    with pytest.raises(ValueError):
        ranked_rollout_row(layers, ranks, 0, 0)


def test_fused_max_and_min_of_float16_equal_the_float_reduction():
    """Max and min fusion of float16 attention go through the int16 view of the bits; with a
    negative weight anywhere in a layer they fall back to the float path. Both equal numpy's."""
    from explorer.analysis.rollout import fused_layers

    att, _, negative = _ties_and_all_fusions(T=40, seed=3)
    for a in (att, negative):
        for fusion, reduce in (("max", np.max), ("min", np.min)):
            got = fused_layers(a, RolloutOptions(head_fusion=fusion, residual=0.0), 1)
            ref = reduce(a.astype(np.float32), axis=1)
            ref = ref / ref.sum(-1, keepdims=True)
            np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)


def test_ranks_must_fit_the_attention():
    from explorer.analysis.rollout import fused_layers, link_ranks

    att = random_attention(L=2, H=2, T=12, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        fused_layers(att, RolloutOptions(discard_ratio=0.5), 1, ranks=link_ranks(att[:1], "mean", 1))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_unnormalised_fused_layers_give_the_same_rollout(dtype):
    """fused_sums keeps F and s = (1 - r)·F·1 + r instead of dividing every row: Â rebuilt from
    them equals fused_layers, and rollout rows from them equal rows from Â; ``nonnegative``
    (no sign check) changes nothing on softmax weights."""
    from explorer.analysis.rollout import fused_layers, fused_sums, link_ranks, rollout_row

    att = random_attention(L=4, H=3, T=30, seed=8).astype(dtype)
    hm = att.astype(np.float32).mean(1)
    for fusion in ("mean", "max", "min"):
        ranks = link_ranks(att, fusion, 2, head_mean=hm)
        for ratio in (0.0, 0.4):
            for start in (0, 2):
                opts = RolloutOptions(head_fusion=fusion, discard_ratio=ratio, start_layer=start, residual=0.3)
                full = fused_layers(att, opts, 2, head_mean=hm).copy()
                f, s = fused_sums(att, opts, 2, head_mean=hm, ranks=ranks, nonnegative=True)
                assert f.shape == (4 - start, 30, 30) and s.shape == (4 - start, 30)
                rebuilt = (0.7 * f + 0.3 * np.eye(30, dtype=np.float32)) / s[..., None]
                np.testing.assert_allclose(rebuilt, full, rtol=1e-6, atol=1e-8)
                for q in (0, 1, 17):
                    np.testing.assert_allclose(rollout_row(att, q, opts, 2, raw=(f, s)),
                                               rollout_row(att, q, opts, 2, fused=full), rtol=1e-5, atol=1e-8)


def test_discard_with_negative_ties_drops_exactly_k():
    """Ties at a negative k-th value matter (zeroing a negative link changes the row): selection,
    ranks and a stable sort agree on rows of a few repeated values, negative ones included."""
    import torch

    from explorer.analysis.rollout import discard_weakest, fused_layers, link_ranks

    row = torch.tensor([[-0.25, -0.25, 0.5, 0.5]])
    discard_weakest(row, 1)
    assert row.tolist() == [[0.0, -0.25, 0.5, 0.5]]
    rng = np.random.default_rng(12)
    x = rng.choice(np.array([-0.5, -0.25, 0.0, 0.25, 0.5], dtype=np.float32), size=(2, 300, 40))
    _discard_equals_a_stable_sort(x, (1, 7, 20, 39))
    att = x.reshape(1, 2, 300, 40)[:, :, :40]  # (L=1, H=2, 40, 40)
    for fusion in ("mean", "max", "min"):
        ranks = link_ranks(att, fusion, 1)
        for ratio in (0.1, 0.5):
            opts = RolloutOptions(head_fusion=fusion, discard_ratio=ratio)
            np.testing.assert_array_equal(fused_layers(att, opts, 1, ranks=ranks), fused_layers(att, opts, 1))


def test_ranks_of_prefix_tokens_only():
    from explorer.analysis.rollout import link_ranks

    ranks = link_ranks(np.full((1, 1, 2, 2), 0.5, np.float32), "mean", 2)
    assert (ranks == np.iinfo(np.int16).max).all()


@pytest.mark.parametrize("key", ["vit", "gap", "deit_distilled", "tnt"])
def test_embedding_final_is_what_the_classifier_reads(key):
    """``Embedding.final`` is the classifier's input: the head applied to it gives the logits of a
    plain forward pass (for an average-pool model the patch mean goes through ``fc_norm`` first,
    which the mean of the normed final tokens alone misses). Layer states: the class token, or the
    patch mean for a model without one, of the Explanation's token states."""
    import torch

    from conftest import build, random_image
    from explorer.analysis.embeddings import embed_images
    from explorer.capture import explain

    m = build(key)
    imgs = [random_image(70, 90, seed=s) for s in range(3)]
    emb = embed_images(m, imgs)
    for i, img in enumerate(imgs):
        exp = explain(m, img)
        if key == "deit_distilled":  # two heads on two tokens: the final embedding is the class token's
            np.testing.assert_allclose(emb.final[i], exp.final_tokens[0], atol=2e-5, rtol=1e-4)
        else:
            with torch.inference_mode():
                logits = m.model.head(torch.from_numpy(emb.final[i:i + 1]))
            np.testing.assert_allclose(logits[0].numpy(), exp.logits, atol=2e-5, rtol=1e-4)
        assert emb.predictions[i] == int(np.argmax(exp.logits))
        lay = exp.layout
        want = exp.tokens[:, 0] if lay.has_class_token else exp.tokens[:, lay.num_prefix:].mean(1)
        np.testing.assert_allclose(emb.class_tokens[:, i], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("key", ["vit", "tnt"])
def test_embedding_lets_go_of_each_batch(monkeypatch, key):
    """The token states of a capture live in one pooled buffer: an embedding copies out what it
    keeps, so the next batch's capture recycles that buffer (views would hold every batch's
    states alive until the end: 250 MB a batch of 32 ViT-B images). The layer states are those
    of one batch of all the images."""
    from conftest import build, random_image
    from explorer.analysis.embeddings import embed_images
    from explorer.capture import _BUFFERS

    m = build(key)
    monkeypatch.setattr(_BUFFERS, "min_bytes", 0)  # pool even a tiny model's buffers
    _BUFFERS.release()
    imgs = [random_image(70, 90, seed=s) for s in range(3)]
    one_by_one = embed_images(m, imgs, batch_size=1)
    f = m.facts
    states_bytes = (len(m.model.blocks) + 2) * f.tokens * f.width * 4  # (1, L + 2, T, D) float32
    assert sum(a.nbytes == states_bytes for a in _BUFFERS._arrays) == 1
    together = embed_images(m, imgs)
    np.testing.assert_allclose(one_by_one.class_tokens, together.class_tokens, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(one_by_one.final, together.final, atol=2e-5, rtol=1e-4)


def test_headless_model_reports_no_prediction():
    """A backbone built with ``num_classes=0`` returns pooled features, not logits: no top-k in
    its Explanation and prediction -1 in an embedding (the app then shows no prediction panel)."""
    import explorer
    from conftest import random_image
    from explorer.analysis.embeddings import embed_images
    from explorer.capture import explain

    m = explorer.load_model("vit_tiny_patch16_224", pretrained=False, use_cache=False, img_size=64, depth=1,
                            num_classes=0)
    exp = explain(m, random_image())
    assert exp.topk == [] and exp.logits.shape == (192,)
    emb = embed_images(m, [random_image(seed=s) for s in range(2)])
    assert emb.predictions.tolist() == [-1, -1]
    first = explain(m, random_image(seed=0))  # the features the model returns are what it pools
    np.testing.assert_allclose(emb.final[0], first.logits, atol=2e-5, rtol=1e-4)
