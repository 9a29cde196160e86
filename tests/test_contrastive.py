"""Tests for clipo_jax.contrastive against an independent loop-based numpy transcription of
docs/clipo.md section 3 (loss), section 4 (reward), section 6 (metrics)."""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipo_jax import contrastive as C

EPS = 1e-8
LOSS_TYPES = ["infonce", "infonce_reference", "supcon_in", "supcon_out", "soft_nn"]
SIMS = ["cosine", "neg_cosine", "l2"]
LEVELS = ["group", "cross", "batch"]
DYNAMIC = list(itertools.product([-1, 0, 1], [True, False]))  # masked_label x skip_trivial


# ------------------------------------------------------------------ numpy reference (CLIPO paper, arXiv 2603.10101: the supervised contrastive loss)
def ref_sim(a, b, sim):
    dot = float(np.dot(a, b))
    if sim == "cosine":
        return dot
    if sim == "neg_cosine":
        return -dot
    return 1.0 - math.sqrt(max(2.0 - 2.0 * dot, 1e-8))


def ref_num_positives(y, g, level):
    b = len(y)
    return np.array(
        [sum(1 for j in range(b) if j != i and y[j] == y[i] and (level == "batch" or g[j] == g[i])) for i in range(b)]
    )


def ref_loss(z, y, g, *, loss_type, level, tau, masked_label, skip_trivial, sim, draws=None):
    """Loop transcription of the spec. draws[i] = rank of the InfoNCE positive among P(i) in
    index order."""
    z = np.asarray(z, np.float64)
    b = len(y)
    per = np.zeros(b)
    m = np.zeros(b)
    for i in range(b):
        s = [ref_sim(z[i], z[j], sim) for j in range(b)]
        row_max = max(s)
        logit = [(s[j] - row_max) / tau for j in range(b)]
        same = [y[i] == y[j] and (level == "batch" or g[i] == g[j]) for j in range(b)]
        all_ = [level != "group" or g[i] == g[j] for j in range(b)]
        n_pos_check = sum(same) - 1
        n_neg = sum(all_) - sum(same)
        P = [j for j in range(b) if same[j] and j != i]
        A = [j for j in range(b) if all_[j] and j != i]
        S = sum(math.exp(logit[a]) for a in A)
        log_den = math.log(S + EPS)
        soft = -(math.log(sum(math.exp(logit[p]) for p in P) + EPS) - log_den)
        if loss_type == "soft_nn":
            L = soft
        elif loss_type == "supcon_in":
            L = soft + math.log(len(P) + EPS)
        elif loss_type == "supcon_out":
            L = -(1.0 / (len(P) + EPS)) * sum(logit[p] - log_den for p in P)
        elif loss_type == "infonce":
            L = -(logit[P[draws[i]]] - log_den) if P else 0.0
        else:  # infonce_reference: the authors' code keeps log(S + eps) for an anchor without a positive
            L = -(logit[P[draws[i]]] - log_den) if P else log_den
        nontrivial = n_pos_check >= 1 and n_neg >= 1
        m[i] = float(y[i] != masked_label and (nontrivial or not skip_trivial))
        per[i] = L * m[i]
    return per, per.sum() / (m.sum() + EPS)


def jax_draws(rng, y, g, level, valid=None):
    """The documented sampling contract: rank k_i ~ randint(rng, [B], 0, max(|P(i)|, 1)), P(i)
    over the valid rows."""
    valid = np.ones(len(y), bool) if valid is None else valid
    n_pos = np.array(
        [
            sum(1 for j in range(len(y)) if valid[j] and j != i and y[j] == y[i] and (level == "batch" or g[j] == g[i]))
            for i in range(len(y))
        ]
    )
    return np.asarray(jax.random.randint(rng, (len(y),), 0, np.maximum(n_pos, 1)))


# ------------------------------------------------------------------ inputs
def dyadic_embeddings(rng, b, d=16):
    """Unit vectors with entries +-1/4 (d=16): every dot product is exact in float32, so the
    blockwise and dense layouts see bit-identical similarities (the l2 self-entry
    1 - sqrt(max(2 - 2|z|^2, 1e-8)) is otherwise sensitive to the last bit of |z|^2)."""
    return (rng.choice([-0.25, 0.25], size=(b, d))).astype(np.float32)


def structured_batch(seed):
    """4 groups of 4: all correct (trivial), a lone correct, 2+2, 3+1; plus a duplicate."""
    rng = np.random.default_rng(seed)
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1])
    g = np.repeat(np.arange(4), 4)
    z = dyadic_embeddings(rng, 16)
    z[9] = z[8]  # identical embeddings (l2 clamp, cosine = 1 off the diagonal)
    return z, y, g


def gaussian_unit(rng, b, d):
    z = rng.normal(size=(b, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


# ------------------------------------------------------------------ loss vs reference
@pytest.mark.parametrize("loss_type,level,sim", list(itertools.product(LOSS_TYPES, LEVELS, SIMS)))
def test_loss_matches_numpy_reference(loss_type, level, sim):
    for seed in (0, 1):
        z, y, g = structured_batch(seed)
        key = jax.random.key(seed)
        draws = jax_draws(key, y, g, level)
        for masked_label, skip in DYNAMIC:
            want_per, want = ref_loss(
                z,
                y,
                g,
                loss_type=loss_type,
                level=level,
                tau=0.05,
                masked_label=masked_label,
                skip_trivial=skip,
                sim=sim,
                draws=draws,
            )
            paths = [True, False] if level == "group" else [True]
            for dense in paths:
                per, loss = C.contrastive_loss(
                    z,
                    y,
                    g,
                    loss_type=loss_type,
                    level=level,
                    similarity=sim,
                    masked_label=masked_label,
                    skip_trivial=skip,
                    rng=key,
                    dense=dense,
                )
                np.testing.assert_allclose(
                    per, want_per, rtol=2e-5, atol=2e-5, err_msg=f"{masked_label=} {skip=} {dense=}"
                )
                np.testing.assert_allclose(loss, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("loss_type,level,sim", list(itertools.product(LOSS_TYPES, LEVELS, SIMS)))
def test_invalid_rows_equal_dropping_them(loss_type, level, sim):
    """valid=False rows (DAPO's padding copies) are neither anchors nor candidates: the loss equals
    the reference computed on the batch with those rows removed, 0 at them, and gradients stay finite."""
    z, y, g = structured_batch(3)
    for valid in (np.repeat([True, True, False, True], 4), np.array([True] * 13 + [False, True, False])):
        key = jax.random.key(5)
        draws = jax_draws(key, y, g, level, valid)
        keep = np.flatnonzero(valid)
        for masked_label, skip in DYNAMIC:
            want_per, want = ref_loss(
                z[keep],
                y[keep],
                g[keep],
                loss_type=loss_type,
                level=level,
                tau=0.05,
                masked_label=masked_label,
                skip_trivial=skip,
                sim=sim,
                draws=draws[keep],
            )
            paths = [True, False] if level == "group" else [True]  # dense and blockwise
            for dense in paths:
                per, loss = C.contrastive_loss(
                    z, y, g, loss_type=loss_type, level=level, similarity=sim, masked_label=masked_label,
                    skip_trivial=skip, rng=key, dense=dense, valid=valid,
                )  # fmt: skip
                per = np.asarray(per)
                np.testing.assert_allclose(per[keep], want_per, rtol=2e-5, atol=2e-5, err_msg=f"{valid=} {dense=}")
                assert np.all(per[~valid] == 0)
                np.testing.assert_allclose(loss, want, rtol=2e-5, atol=2e-5)
            grad = jax.grad(
                lambda e: C.contrastive_loss(
                    e, y, g, loss_type=loss_type, level=level, similarity=sim, masked_label=masked_label,
                    skip_trivial=skip, rng=key, valid=valid, dense=level != "group",
                )[1]
            )(jnp.asarray(z))  # fmt: skip
            assert np.all(np.isfinite(np.asarray(grad)))
            assert np.all(np.asarray(grad)[~valid] == 0)  # a padding row gets no gradient


def test_head_step_ignores_padding_groups():
    """The head update with a padding group masked equals the update on the real groups alone."""
    pooled, y, g = _head_batch(4)  # 3 groups of 4
    cfg = C.ContrastiveConfig(group_size=4, d_out=5, loss_type="supcon_out")
    base = C.init_head_state(jax.random.key(0), pooled.shape[1], cfg)
    copy = lambda st: jax.tree.map(jnp.array, st)  # head_step donates its state
    padded = np.concatenate([pooled, pooled[:4]])  # a copy of group 0 appended, as DAPO pads
    y_pad, g_pad = np.concatenate([y, y[:4]]), np.repeat(np.arange(4), 4)
    valid = np.arange(16) < 12
    masked, per_m, loss_m, _ = C.head_step(copy(base), padded, y_pad, g_pad, jax.random.key(1), cfg, valid=valid)
    alone, per_a, loss_a, _ = C.head_step(copy(base), pooled, y, g, jax.random.key(1), cfg)
    with_pad, _, loss_p, _ = C.head_step(copy(base), padded, y_pad, g_pad, jax.random.key(1), cfg)
    np.testing.assert_allclose(per_m[:12], per_a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(masked.params), jax.tree.leaves(alone.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.isclose(float(loss_p), float(loss_a), rtol=1e-6)  # unmasked, the copy does count


@pytest.mark.parametrize("loss_type,sim", list(itertools.product(LOSS_TYPES, SIMS)))
def test_blockwise_equals_dense(loss_type, sim):
    """Values, InfoNCE draws and gradients agree between the [P,G,G] and the BxB layouts."""
    rng = np.random.default_rng(7)
    p, gsize = 6, 8
    b = p * gsize
    y = rng.integers(0, 2, b)
    g = np.repeat(np.arange(p), gsize)
    key = jax.random.key(3)

    # masked_label / skip_trivial are traced, so each layout compiles once per test.
    @functools.partial(jax.jit, static_argnames="dense")
    def f(emb, masked_label, skip, dense):
        def batch_loss(e):
            per, loss = C.contrastive_loss(
                e,
                y,
                g,
                loss_type=loss_type,
                similarity=sim,
                masked_label=masked_label,
                skip_trivial=skip,
                rng=key,
                group_size=gsize,
                dense=dense,
            )
            return loss, per

        return jax.value_and_grad(batch_loss, has_aux=True)(emb)

    for k, z in enumerate((dyadic_embeddings(rng, b), gaussian_unit(rng, b, 16))):
        tol = 2e-5 if (sim != "l2" or k == 0) else 2e-2  # see dyadic_embeddings
        for masked_label, skip in DYNAMIC:
            (lb, pb), gb = f(z, masked_label, skip, dense=False)
            (ld, pd), gd = f(z, masked_label, skip, dense=True)
            np.testing.assert_allclose(pb, pd, rtol=tol, atol=tol)
            np.testing.assert_allclose(lb, ld, rtol=tol, atol=tol)
            if tol == 2e-5:
                np.testing.assert_allclose(gb, gd, rtol=1e-4, atol=1e-5)


def test_blockwise_group_never_builds_bxb():
    """The compiled group-level loss holds no [B, B] buffer: its temp memory is far below B^2."""
    p, gsize, d = 64, 16, 32
    b = p * gsize
    z = jnp.asarray(gaussian_unit(np.random.default_rng(0), b, d))
    y = jnp.zeros(b, jnp.int32).at[::2].set(1)
    g = jnp.repeat(jnp.arange(p), gsize)

    def loss(e, dense):
        return C.contrastive_loss(e, y, g, rng=jax.random.key(0), group_size=gsize, dense=dense)[1]

    def temp_bytes(dense):
        fn = jax.jit(jax.value_and_grad(lambda e: loss(e, dense)))
        return fn.lower(z).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(False) < b * b * 4 / 4  # a single f32 BxB matrix would be 4 MiB
    assert temp_bytes(True) >= b * b * 4


# ------------------------------------------------------------------ analytic cases
def test_analytic_log7():
    z = np.zeros((16, 16), np.float32)
    z[:8, 0] = 1.0
    for i in range(8):
        z[8 + i, 1 + i] = 1.0
    y = np.array([1] * 8 + [0] * 8)
    per, loss = C.contrastive_loss(z, y, np.zeros(16, int), rng=jax.random.key(0))
    np.testing.assert_allclose(per[:8], math.log(7), rtol=1e-6)
    np.testing.assert_allclose(per[8:], 0.0)
    np.testing.assert_allclose(loss, 1.9459, atol=1e-4)


def test_analytic_all_orthogonal():
    y = np.array([1] * 8 + [0] * 8)
    per, _ = C.contrastive_loss(np.eye(16, dtype=np.float32), y, np.zeros(16, int), rng=jax.random.key(0))
    want = -(-20.0 - math.log(15 * math.exp(-20.0) + 1e-8))  # ~2.988, not log 15
    np.testing.assert_allclose(per[:8], want, rtol=1e-5)
    np.testing.assert_allclose(per[:8], 2.988, atol=1e-3)
    assert abs(want - math.log(15)) > 0.2


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("loss_type", ["supcon_in", "supcon_out", "soft_nn"])
def test_permutation_within_group_invariant(loss_type):
    rng = np.random.default_rng(2)
    p, gsize = 4, 6
    z = gaussian_unit(rng, p * gsize, 8)
    y = rng.integers(0, 2, p * gsize)
    g = np.repeat(np.arange(p), gsize)
    perm = np.concatenate([k * gsize + rng.permutation(gsize) for k in range(p)])
    for level in LEVELS:
        per, loss = C.contrastive_loss(z, y, g, loss_type=loss_type, level=level, masked_label=-1)
        per2, loss2 = C.contrastive_loss(z[perm], y[perm], g, loss_type=loss_type, level=level, masked_label=-1)
        np.testing.assert_allclose(per2, np.asarray(per)[perm], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(loss2, loss, rtol=1e-5)


def test_permutation_within_group_infonce_single_positive():
    """With exactly one positive per anchor the draw is deterministic, so InfoNCE is invariant."""
    rng = np.random.default_rng(4)
    y = np.array([1, 1, 0, 0] * 3)
    g = np.repeat(np.arange(3), 4)
    z = gaussian_unit(rng, 12, 8)
    perm = np.concatenate([k * 4 + rng.permutation(4) for k in range(3)])
    per, loss = C.contrastive_loss(z, y, g, masked_label=-1, rng=jax.random.key(0))
    per2, loss2 = C.contrastive_loss(z[perm], y[perm], g, masked_label=-1, rng=jax.random.key(9))
    np.testing.assert_allclose(per2, np.asarray(per)[perm], rtol=1e-5)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    assert np.all(np.asarray(per) > 0)


def test_infonce_positive_is_uniform_and_seeded():
    """Anchor 0 has 3 positives at distinct similarities, so its loss reveals which was drawn."""
    z = np.zeros((6, 4), np.float32)
    z[0] = [1, 0, 0, 0]
    for j, c in zip((1, 2, 3), (0.9, 0.5, 0.1)):
        z[j] = [c, math.sqrt(1 - c * c), 0, 0]
    z[4] = [0, 0, 1, 0]
    z[5] = [0, 0, 0, 1]
    y = np.array([1, 1, 1, 1, 0, 0])
    g = np.zeros(6, int)
    keys = jax.random.split(jax.random.key(123), 3000)
    per0 = jax.vmap(lambda k: C.contrastive_loss(z, y, g, rng=k, group_size=6)[0][0])(keys)
    values = np.unique(np.round(np.asarray(per0), 4))
    assert len(values) == 3
    freq = np.array([np.mean(np.isclose(per0, v, atol=1e-3)) for v in values])
    np.testing.assert_allclose(freq, 1 / 3, atol=0.05)
    a = C.contrastive_loss(z, y, g, rng=jax.random.key(5))[0]
    b = C.contrastive_loss(z, y, g, rng=jax.random.key(5))[0]
    np.testing.assert_array_equal(a, b)


def test_trivial_groups_give_zero():
    rng = np.random.default_rng(0)
    z = gaussian_unit(rng, 8, 6)
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])  # each group of 4 is single-label
    g = np.repeat([0, 1], 4)
    for lt in LOSS_TYPES:
        per, loss = C.contrastive_loss(z, y, g, loss_type=lt, masked_label=-1, rng=jax.random.key(0))
        np.testing.assert_array_equal(per, 0.0)
        assert float(loss) == 0.0
        # Without skipping they count: soft_nn is 0 there (positives == denominator), the others
        # are not, and the batch loss averages over all 8 anchors.
        per, loss = C.contrastive_loss(
            z, y, g, loss_type=lt, masked_label=-1, skip_trivial=False, rng=jax.random.key(0)
        )
        assert np.all(np.asarray(per) != 0.0) == (lt != "soft_nn")
        np.testing.assert_allclose(loss, np.asarray(per).sum() / (8 + EPS), rtol=1e-6)


def test_masked_anchors_zero_but_still_negatives():
    rng = np.random.default_rng(1)
    z = gaussian_unit(rng, 8, 6)
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    g = np.zeros(8, int)
    for lt in LOSS_TYPES:
        kw = dict(loss_type=lt, rng=jax.random.key(0), masked_label=0)
        per, _ = C.contrastive_loss(z, y, g, **kw)
        assert np.all(np.asarray(per)[y == 0] == 0.0)
        assert np.all(np.asarray(per)[y == 1] > 0.0)
        z2 = z.copy()
        z2[3] = z[0]  # move a (masked) incorrect response onto a correct anchor
        per2, _ = C.contrastive_loss(z2, y, g, **kw)
        assert float(per2[0]) > float(per[0]) + 1e-3  # it entered anchor 0's denominator


# ------------------------------------------------------------------ reward
def test_reward_formula_and_ranges():
    rng = np.random.default_rng(0)
    z = gaussian_unit(rng, 32, 8)
    y = rng.integers(0, 2, 32)
    g = np.repeat(np.arange(2), 16)
    per, _ = C.contrastive_loss(z, y, g, rng=jax.random.key(0))
    c = np.asarray(C.contrastive_reward(per, y))
    want = [max(0.0 - 0.2 * float(per[i]) * (y[i] == 1), -0.5) for i in range(32)]
    np.testing.assert_allclose(c, want, rtol=1e-6)
    total = y + c
    assert np.all((total[y == 1] >= 0.5) & (total[y == 1] <= 1.0))
    np.testing.assert_array_equal(c[y == 0], 0.0)
    assert np.any(c[y == 1] == -0.5) or np.all(np.asarray(per)[y == 1] * 0.2 <= 0.5)
    c2 = C.contrastive_reward(np.array([1.0, 10.0, 1.0]), np.array([1, 1, 0]), lam=0.1, c0=0.3, clip_min=-0.2)
    np.testing.assert_allclose(c2, [0.2, -0.2, 0.3], rtol=1e-6)


# ------------------------------------------------------------------ validation
def test_bad_inputs_raise_clear_errors():
    z = np.eye(8, dtype=np.float32)
    y = np.zeros(8, int)
    with pytest.raises(C.ContrastiveError, match="loss_type"):
        C.contrastive_loss(z, y, np.zeros(8, int), loss_type="nope")
    with pytest.raises(C.ContrastiveError, match="rng"):
        C.contrastive_loss(z, y, np.zeros(8, int))
    with pytest.raises(C.ContrastiveError, match="not contiguous"):
        C.contrastive_loss(z, y, np.array([0, 1, 0, 1, 2, 3, 2, 3]), loss_type="soft_nn")
    with pytest.raises(C.ContrastiveError, match="unequal"):
        C.contrastive_loss(z, y, np.array([0, 0, 0, 1, 1, 1, 1, 1]), loss_type="soft_nn")
    with pytest.raises(C.ContrastiveError, match="group_size=4 but"):
        C.contrastive_loss(z, y, np.zeros(8, int), loss_type="soft_nn", group_size=4)
    with pytest.raises(C.ContrastiveError, match="labels"):
        C.contrastive_loss(z, y[:7], np.zeros(8, int), loss_type="soft_nn")
    with pytest.raises(C.ContrastiveError, match="temperature"):
        C.contrastive_loss(z, y, np.zeros(8, int), loss_type="soft_nn", temperature=0.0)
    with pytest.raises(C.ContrastiveError, match="group_size is required"):
        jax.jit(lambda e, gi: C.contrastive_loss(e, y, gi, loss_type="soft_nn"))(z, np.zeros(8))
    with pytest.raises(C.ContrastiveError, match="group_size must be set"):
        C.ContrastiveConfig().validate()
    # Non-contiguous ids are fine on the dense path.
    C.contrastive_loss(z, y, np.array([0, 1, 0, 1, 2, 3, 2, 3]), loss_type="soft_nn", dense=True)


def test_registries_extend():
    C.register_similarity("dot2", lambda a, b: 2.0 * C.cosine_similarity(a, b))
    C.register_loss("denom_only", lambda rows: rows.log_denominator)
    try:
        z = gaussian_unit(np.random.default_rng(0), 8, 4)
        y = np.array([1, 1, 0, 0] * 2)
        g = np.repeat([0, 1], 4)
        a = C.contrastive_loss(z, y, g, loss_type="denom_only", similarity="dot2", masked_label=-1)
        b = C.contrastive_loss(z, y, g, loss_type="denom_only", similarity="dot2", masked_label=-1, dense=True)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
        s = 2 * z @ z.T
        row = (s[0] - s[0].max()) / 0.05
        np.testing.assert_allclose(a[0][0], math.log(np.exp(row[1:4]).sum() + EPS), rtol=1e-5)
    finally:
        del C.SIMILARITIES["dot2"], C.LOSSES["denom_only"]


# ------------------------------------------------------------------ head
def np_head(params, x):
    h = np.asarray(x, np.float64)
    if "hidden" in params:
        h = np.maximum(h @ np.asarray(params["hidden"]["kernel"], np.float64), 0)
    h = h @ np.asarray(params["proj"]["kernel"], np.float64)
    return h / np.linalg.norm(h, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_apply(kind):
    params = C.init_head(jax.random.key(0), 12, 5, kind)
    shapes = jax.tree.map(np.shape, params)
    assert shapes == (
        {"proj": {"kernel": (12, 5)}}
        if kind == "linear"
        else {"hidden": {"kernel": (12, 12)}, "proj": {"kernel": (12, 5)}}
    )
    bound = 1 / math.sqrt(12)
    assert all(np.abs(np.asarray(k)).max() <= bound for k in jax.tree.leaves(params))
    x = np.random.default_rng(0).normal(size=(7, 12)).astype(np.float32)
    z = C.head_apply(params, x)
    np.testing.assert_allclose(z, np_head(params, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-6)


def _head_batch(seed, p=3, gsize=4, hidden=6):
    rng = np.random.default_rng(seed)
    pooled = rng.normal(size=(p * gsize, hidden)).astype(np.float32)
    y = np.tile([1, 1, 0, 1], p)[: p * gsize]
    g = np.repeat(np.arange(p), gsize)
    return pooled, y, g


def np_adamw_step(params, grads, lr=1e-3, wd=0.01, b1=0.9, b2=0.999, eps=1e-8):
    """First AdamW step from zero moments (torch.optim.AdamW semantics)."""
    out = {}
    for k, p in params.items():
        g = grads[k]
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        out[k] = p * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)
    return out


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_step_loss_gradient_and_update(kind):
    pooled, y, g = _head_batch(0)
    cfg = C.ContrastiveConfig(loss_type="soft_nn", temperature=0.2, group_size=4, head=kind, d_out=5, masked_label=-1)
    state = C.init_head_state(jax.random.key(1), 6, cfg)
    params0 = jax.tree.map(np.asarray, state.params)

    def ref(flat_params):
        z = np_head(flat_params, pooled)
        return ref_loss(
            z, y, g, loss_type="soft_nn", level="group", tau=0.2, masked_label=-1, skip_trivial=True, sim="cosine"
        )

    want_per, want_loss = ref(params0)
    new_state, per, loss, metrics = C.head_step(state, pooled, y, g, jax.random.key(2), cfg)
    np.testing.assert_allclose(per, want_per, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-4)
    assert int(new_state.step) == 1

    # Gradient of the batch loss by central differences on the float64 reference.
    grads = jax.grad(lambda prm: C._head_loss(prm, pooled, y, g, jax.random.key(2), jnp.ones(len(y), bool), cfg)[0])(
        jax.tree.map(jnp.asarray, params0)
    )
    h = 1e-5
    for name in params0:
        kernel = params0[name]["kernel"].astype(np.float64)
        for idx in [(0, 0), (2, 3), (5, 1)]:
            plus = {k: {"kernel": v["kernel"].astype(np.float64)} for k, v in params0.items()}
            minus = {k: {"kernel": v["kernel"].astype(np.float64)} for k, v in params0.items()}
            plus[name]["kernel"][idx] = kernel[idx] + h
            minus[name]["kernel"][idx] = kernel[idx] - h
            fd = (ref(plus)[1] - ref(minus)[1]) / (2 * h)
            np.testing.assert_allclose(grads[name]["kernel"][idx], fd, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(metrics["contrastive/head_grad_norm"], optax.tree.norm(grads), rtol=1e-5)

    # One AdamW step, checked against a plain numpy AdamW.
    flat_p = {k: v["kernel"].astype(np.float64) for k, v in params0.items()}
    flat_g = {k: np.asarray(v["kernel"], np.float64) for k, v in grads.items()}
    want_new = np_adamw_step(flat_p, flat_g)
    for k in flat_p:
        np.testing.assert_allclose(new_state.params[k]["kernel"], want_new[k], rtol=1e-5, atol=1e-7)
        assert not np.allclose(new_state.params[k]["kernel"], params0[k]["kernel"])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_step_zero_pooled_row_keeps_finite_gradient(kind):
    # A one-token response has no decode state to pool: its pooled row is 0, and so is the
    # bias-free head's output. Its embedding is 0 (as F.normalize gives) and the head's gradient
    # must stay finite: a NaN here made the whole head, then the rewards, NaN.
    pooled, y, g = _head_batch(3)
    pooled[5] = 0.0
    cfg = C.ContrastiveConfig(group_size=4, head=kind, d_out=5, lr=0.1)
    state = C.init_head_state(jax.random.key(0), 6, cfg)
    params0 = jax.tree.map(np.asarray, state.params)
    z = np.asarray(C.head_apply(state.params, pooled))
    np.testing.assert_array_equal(z[5], 0.0)
    others = np.delete(np.arange(len(y)), 5)
    np.testing.assert_allclose(z[others], np_head(params0, pooled[others]), rtol=1e-5, atol=1e-6)
    state, per, loss, metrics = C.head_step(state, pooled, y, g, jax.random.key(1), cfg)
    assert (
        np.isfinite(float(metrics["contrastive/head_grad_norm"])) and float(metrics["contrastive/head_grad_norm"]) > 0
    )
    assert np.all(np.isfinite(per)) and np.isfinite(float(loss))
    for leaf in jax.tree.leaves(state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_fixed_head_and_no_recompile():
    pooled, y, g = _head_batch(1)
    cfg = C.ContrastiveConfig(group_size=4, d_out=5, fixed_head=True)
    state = C.init_head_state(jax.random.key(0), 6, cfg)
    p0 = jax.tree.map(np.array, state.params)
    z = C.head_apply(state.params, pooled)
    want_per, want_loss = C.contrastive_loss(z, y, g, rng=jax.random.key(3))
    before = C._head_step_impl._cache_size()
    for step in range(3):
        state, per, loss, _ = C.head_step(state, pooled + step * 0.0, y, g, jax.random.key(3), cfg)
        np.testing.assert_allclose(per, want_per, rtol=1e-6)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert C._head_step_impl._cache_size() == before + 1
    assert int(state.step) == 3
    jax.tree.map(np.testing.assert_array_equal, state.params, p0)


def test_per_sample_is_before_update():
    pooled, y, g = _head_batch(2)
    cfg = C.ContrastiveConfig(group_size=4, d_out=5, lr=0.1)
    state = C.init_head_state(jax.random.key(0), 6, cfg)
    z_before = C.head_apply(state.params, pooled)
    want, _ = C.contrastive_loss(z_before, y, g, rng=jax.random.key(1))
    state, per, _, _ = C.head_step(state, pooled, y, g, jax.random.key(1), cfg)
    np.testing.assert_allclose(per, want, rtol=1e-6)
    after, _ = C.contrastive_loss(C.head_apply(state.params, pooled), y, g, rng=jax.random.key(1))
    assert not np.allclose(after, want)


def test_head_state_orbax_roundtrip(tmp_path):
    import orbax.checkpoint as ocp

    cfg = C.ContrastiveConfig(group_size=4, d_out=5, head="mlp")
    state = C.init_head_state(jax.random.key(0), 6, cfg)
    pooled, y, g = _head_batch(0)
    state, *_ = C.head_step(state, pooled, y, g, jax.random.key(1), cfg)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "head", state)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckpt.restore(tmp_path / "head", abstract)
    assert isinstance(restored, C.HeadState)
    jax.tree.map(np.testing.assert_array_equal, restored, state)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_file_roundtrip_and_checks(tmp_path, kind):
    cfg = C.ContrastiveConfig(group_size=4, d_out=5, head=kind)
    state = C.init_head_state(jax.random.key(0), 6, cfg)
    path = str(tmp_path / "head.safetensors")
    C.save_head(path, state.params)
    loaded = C.load_head(path, 6, cfg)
    jax.tree.map(np.testing.assert_array_equal, loaded, state.params)
    pooled, y, g = _head_batch(0)
    # a loaded head with a fresh optimizer takes the same step as the original at step 0
    a, per_a, *_ = C.head_step(C.head_state_from_params(loaded, cfg), pooled, y, g, jax.random.key(1), cfg)
    b, per_b, *_ = C.head_step(state, pooled, y, g, jax.random.key(1), cfg)
    np.testing.assert_array_equal(per_a, per_b)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    with pytest.raises(C.ContrastiveError, match="shape"):
        C.load_head(path, 7, cfg)  # another hidden size
    with pytest.raises(C.ContrastiveError, match="do not make"):
        C.load_head(path, 6, dataclasses.replace(cfg, head="mlp" if kind == "linear" else "linear"))
    (tmp_path / "bad").write_bytes(b"not a safetensors file")
    with pytest.raises(C.ContrastiveError, match="cannot read"):
        C.load_head(str(tmp_path / "bad"), 6, cfg)
    nan = jax.tree.map(lambda x: np.full(x.shape, np.nan, np.float32), state.params)
    C.save_head(path, nan)
    with pytest.raises(C.ContrastiveError, match="NaN"):
        C.load_head(path, 6, cfg)


# ------------------------------------------------------------------ metrics (CLIPO paper, arXiv 2603.10101: the reference's logged metrics)
def np_stats(vals):
    vals = np.asarray(vals, np.float64)
    if vals.size == 0:
        return 0.0, 0.0, 0.0, 0
    return vals.mean(), vals.max(), vals.min(), vals.size


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    p, gsize, hidden, d = 3, 4, 6, 5
    b = p * gsize
    pooled = rng.normal(size=(b, hidden)).astype(np.float32) * 3
    z = gaussian_unit(rng, b, d)
    y = np.array([1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0])
    g = np.repeat(np.arange(p), gsize)
    lengths = rng.integers(5, 100, b)
    per = rng.uniform(0, 3, b) * (y == 1)
    reward = np.asarray(C.contrastive_reward(per, y))
    out = C.contrastive_metrics(pooled, z, y, g, lengths, per, reward)
    out = {k: float(v) for k, v in out.items()}

    def check(prefix, vals):
        mean, mx, mn, n = np_stats(vals)
        np.testing.assert_allclose(
            [out[f"{prefix}/mean"], out[f"{prefix}/max"], out[f"{prefix}/min"]],
            [mean, mx, mn],
            rtol=1e-4,
            atol=1e-4,
            err_msg=prefix,
        )
        return n

    for name, sel in (("correct", y == 1), ("incorrect", y == 0)):
        assert out[f"clipo/count/{name}"] == check(f"clipo/loss/{name}", per[sel])
        check(f"clipo/length/{name}", lengths[sel])
    for name, sel in (("all", y >= 0), ("correct", y == 1), ("incorrect", y == 0)):
        check(f"clipo/reward/{name}", reward[sel])

    q = np.quantile(lengths.astype(np.float64), [0.25, 0.5, 0.75])
    bucket = [int(sum(l > t for t in q)) for l in lengths]
    masks = {
        "correct_correct": lambda i, j: y[i] == 1 and y[j] == 1,
        "incorrect_incorrect": lambda i, j: y[i] == 0 and y[j] == 0,
        "mixed": lambda i, j: y[i] != y[j],
    }
    masks.update({f"group_{k}": (lambda f: lambda i, j: g[i] == g[j] and f(i, j))(f) for k, f in list(masks.items())})
    masks.update({f"length_q{k + 1}": (lambda k: lambda i, j: bucket[i] == k == bucket[j])(k) for k in range(4)})
    seen_pairs = 0
    for mname, pred in masks.items():
        pairs = [(i, j) for i in range(b) for j in range(i + 1, b) if pred(i, j)]
        for space, x in (("pooled", pooled.astype(np.float64)), ("head", z.astype(np.float64))):
            cos = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for i, j in pairs]
            l2 = [np.linalg.norm(x[i] - x[j]) for i, j in pairs]
            check(f"clipo/geometry/{mname}/{space}_cos", cos)
            check(f"clipo/geometry/{mname}/{space}_l2", l2)
        assert out[f"clipo/geometry/{mname}/pairs"] == len(pairs)
        seen_pairs += len(pairs)
    assert seen_pairs > 20

    small = C.contrastive_metrics(pooled, z, y, g, lengths, per, reward, dense_geometry=False)
    assert "clipo/geometry/mixed/pairs" not in small
    assert float(small["clipo/geometry/group_mixed/pairs"]) == out["clipo/geometry/group_mixed/pairs"]
