"""CLIPO: contrastive head, contrastive losses, contrastive reward, embedding metrics.

Spec: docs/clipo.md. Each response is one pooled hidden vector (stop-gradient data). A small head
maps it to a unit-norm embedding; a supervised contrastive loss over the rollout group gives a
per-sample loss L_i, and correct responses get the reward c_i = max(c0 - lam * L_i, clip_min).

Numerics follow the authors' reference code (github.com/Qwen-Applications/CLIPO) exactly (eps = 1e-8 placement, row max over the full row,
temperature 0.05 by default). At group level the loss is computed blockwise on
``[prompts, group, dim]`` -- O(B*G*D) compute and memory, never a BxB matrix -- and is proven equal
to the dense BxB formulation in tests/test_contrastive.py.

Extending: add a similarity with ``register_similarity`` or a loss type with ``register_loss``;
both are picked by string from configs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from clipo_jax import parallel

Array = jax.Array

EPS = 1e-8  # the reference's eps; it matters at temperature 0.05 (CLIPO paper, arXiv 2603.10101, the contrastive loss).
NORMALIZE_EPS = 1e-12  # floor on the norm when L2-normalising head outputs.
LEVELS = ("group", "cross", "batch")


class ContrastiveError(ValueError):
    """Bad contrastive option or input; the message names the field."""


# ----------------------------------------------------------------------------------------------
# Similarity registry
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Similarity:
    """fn(a[..., n, D], b[..., m, D]) -> s[..., n, m].

    max_at_self: for unit-norm inputs the largest entry of row i is s_ii (true when s is increasing
    in the dot product). Then the blockwise path may take the reference's full-row max from the
    anchor's own group block. When False the blockwise path computes the exact full-row max in
    column chunks (O(B^2 D) compute but O(B*G) memory).
    """

    fn: Callable[[Array, Array], Array]
    max_at_self: bool = False


def _einsum_dot(a: Array, b: Array) -> Array:
    # HIGHEST: at temperature 0.05 a bf16/TF32 dot error of 1e-2 becomes 0.2 in the logits.
    return jnp.einsum("...nd,...md->...nm", a, b, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def _gram(x: Array) -> Array:
    """x [..., n, D] -> x x^T [..., n, n]."""
    return _einsum_dot(x, x)


def _gram_fwd(x):
    return _einsum_dot(x, x), x


def _gram_bwd(x, g):
    # d/dx sum(g * x x^T) = (g + g^T) x: one batched matmul instead of autodiff's two (with
    # transposes); 3-10x faster for the [P, G, G] blocks on XLA CPU.
    g = g + jnp.swapaxes(g, -1, -2)
    return (jnp.einsum("...nm,...md->...nd", g, x, precision=jax.lax.Precision.HIGHEST),)


_gram.defvjp(_gram_fwd, _gram_bwd)


def _dot(a: Array, b: Array) -> Array:
    """a [..., n, D], b [..., m, D] -> a b^T [..., n, m] in full float32 precision."""
    return _gram(a) if a is b else _einsum_dot(a, b)


def cosine_similarity(a: Array, b: Array) -> Array:
    """z_i . z_j (inputs are unit-norm)."""
    return _dot(a, b)


def neg_cosine_similarity(a: Array, b: Array) -> Array:
    """-z_i . z_j."""
    return -_dot(a, b)


def l2_similarity(a: Array, b: Array) -> Array:
    """1 - sqrt(max(2 - 2 z_i . z_j, 1e-8)) (unit-norm inputs: 1 - Euclidean distance)."""
    return 1.0 - jnp.sqrt(jnp.maximum(2.0 - 2.0 * _dot(a, b), 1e-8))


SIMILARITIES: dict[str, Similarity] = {
    "cosine": Similarity(cosine_similarity, max_at_self=True),
    "neg_cosine": Similarity(neg_cosine_similarity, max_at_self=False),
    "l2": Similarity(l2_similarity, max_at_self=True),
}


def register_similarity(name: str, fn: Callable[[Array, Array], Array], max_at_self: bool = False):
    """Adds a similarity usable as ``similarity=name``."""
    SIMILARITIES[name] = Similarity(fn, max_at_self)


# ----------------------------------------------------------------------------------------------
# Loss registry
# ----------------------------------------------------------------------------------------------
class AnchorRows(NamedTuple):
    """Everything a loss type needs, per anchor row. Leading dim is the batch B; the column dim m
    is the anchor's candidate-positive columns (G at group/cross level blockwise, B dense)."""

    logits: Array  # [B, m] l_ij = (s_ij - max_k s_ik) / tau
    positive_mask: Array  # [B, m] bool, P(i): same label (and group unless level=batch), not self
    num_positives: Array  # [B] float32, |P(i)|
    log_denominator: Array  # [B] log(S_i + eps), S_i = sum over A(i) of exp(l_ia)
    sampled_positive: Array | None  # [B, m] bool one-hot of the drawn positive (sampling losses)


@dataclasses.dataclass(frozen=True)
class LossType:
    """fn(rows: AnchorRows) -> L[B] (before anchor masking). samples_positive: the framework draws
    one positive per anchor (uniform over P(i), from the rng) into rows.sampled_positive."""

    fn: Callable[[AnchorRows], Array]
    samples_positive: bool = False


def _sum_where(mask: Array, x: Array) -> Array:
    return jnp.sum(jnp.where(mask, x, 0.0), axis=-1)


def soft_nn_loss(rows: AnchorRows) -> Array:
    """L_i = -[log(sum_P exp l_ip + eps) - log(S_i + eps)]."""
    pos_sum = _sum_where(rows.positive_mask, jnp.exp(rows.logits))
    return -(jnp.log(pos_sum + EPS) - rows.log_denominator)


def supcon_in_loss(rows: AnchorRows) -> Array:
    """soft_nn + log(|P| + eps)."""
    return soft_nn_loss(rows) + jnp.log(rows.num_positives + EPS)


def supcon_out_loss(rows: AnchorRows) -> Array:
    """L_i = -(1/(|P|+eps)) sum_P [l_ip - log(S_i + eps)]."""
    terms = rows.logits - rows.log_denominator[:, None]
    return -_sum_where(rows.positive_mask, terms) / (rows.num_positives + EPS)


def infonce_loss(rows: AnchorRows) -> Array:
    """L_i = -[l_{i p_i} - log(S_i + eps)] for one drawn positive p_i; 0 when P(i) is empty (only
    reachable with skip_trivial off), like supcon_out's empty sum."""
    picked = _sum_where(rows.sampled_positive, rows.logits)
    return jnp.where(rows.num_positives > 0, -(picked - rows.log_denominator), 0.0)


def infonce_reference_loss(rows: AnchorRows) -> Array:
    """InfoNCE as the authors' code computes it for an anchor without a positive (reachable with
    skip_trivial off): the positive term is empty, so L_i = log(S_i + eps) -- unclamped, and
    negative when the row's logits are all far below its max."""
    picked = _sum_where(rows.sampled_positive, rows.logits)
    return -(picked - rows.log_denominator)


LOSSES: dict[str, LossType] = {
    "infonce": LossType(infonce_loss, samples_positive=True),
    "infonce_reference": LossType(infonce_reference_loss, samples_positive=True),
    "supcon_in": LossType(supcon_in_loss),
    "supcon_out": LossType(supcon_out_loss),
    "soft_nn": LossType(soft_nn_loss),
}


def register_loss(name: str, fn: Callable[[AnchorRows], Array], samples_positive: bool = False):
    """Adds a loss type usable as ``loss_type=name``."""
    LOSSES[name] = LossType(fn, samples_positive)


# ----------------------------------------------------------------------------------------------
# Validation (host side, only on concrete values)
# ----------------------------------------------------------------------------------------------
def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_options(loss_type, level, similarity, temperature):
    if loss_type not in LOSSES:
        raise ContrastiveError(f"loss_type={loss_type!r} is not one of {sorted(LOSSES)}")
    if level not in LEVELS:
        raise ContrastiveError(f"level={level!r} is not one of {list(LEVELS)}")
    if similarity not in SIMILARITIES:
        raise ContrastiveError(f"similarity={similarity!r} is not one of {sorted(SIMILARITIES)}")
    if _is_concrete(temperature) and not float(temperature) > 0:
        raise ContrastiveError(f"temperature={temperature!r} must be > 0")


def infer_group_size(group_ids) -> int:
    """Group size of concrete contiguous equal-sized group ids ``[B]``; raises if they are not."""
    g = np.asarray(group_ids)
    if g.ndim != 1 or g.size == 0:
        raise ContrastiveError(f"group_ids must be a non-empty [B] vector, got shape {g.shape}")
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, g.size])
    if np.unique(g).size != starts.size:
        raise ContrastiveError("group_ids are not contiguous: a group id appears in two runs")
    if np.any(sizes != sizes[0]):
        raise ContrastiveError(f"group_ids give unequal group sizes {sorted(set(sizes.tolist()))}")
    return int(sizes[0])


def _check_group_ids(group_ids, group_size: int):
    b = group_ids.shape[0]
    if group_size <= 0 or b % group_size:
        raise ContrastiveError(f"group_size={group_size} does not divide batch size {b}")
    if _is_concrete(group_ids):
        inferred = infer_group_size(group_ids)
        if inferred != group_size:
            raise ContrastiveError(f"group_size={group_size} but group_ids have groups of {inferred}")


def _check_shapes(embeddings, labels, group_ids):
    if embeddings.ndim != 2:
        raise ContrastiveError(f"embeddings must be [B, D], got shape {embeddings.shape}")
    b = embeddings.shape[0]
    for name, x in (("labels", labels), ("group_ids", group_ids)):
        if x.shape != (b,):
            raise ContrastiveError(f"{name} must be [B]=[{b}], got shape {x.shape}")


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def _masked_row_max(s: Array, cols: Array, fallback: Array) -> Array:
    """max over the valid columns of each row; ``fallback`` where a row has none (a padding row,
    whose loss is dropped: it only has to stay finite so that no NaN reaches the gradient)."""
    m = jnp.max(jnp.where(cols, s, -jnp.inf), axis=-1)
    return jnp.where(jnp.any(cols, axis=-1), m, fallback)


def _full_row_max(z: Array, valid: Array, sim: Similarity, chunk: int) -> Array:
    """max_j s_ij over the valid rows j of the whole batch, [B], computed chunk by chunk of columns
    (O(B*chunk) memory)."""
    b, d = z.shape
    cols = z.reshape(b // chunk, chunk, d)
    ok = valid.reshape(b // chunk, 1, chunk)
    per_chunk = jax.lax.map(
        lambda c: jnp.max(jnp.where(c[1], sim.fn(z, c[0]), -jnp.inf), axis=-1), (cols, ok)
    )  # [B/chunk, B]
    m = jnp.max(per_chunk, axis=0)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _dense_rows(z, labels, group_ids, valid, level, sim, temperature):
    """Reference BxB formulation over the valid rows. Returns (logits, pos, n_pos, n_neg, log_denom)."""
    b = z.shape[0]
    s = sim.fn(z, z)  # [B, B]
    cols = jnp.broadcast_to(valid[None, :], (b, b))  # a padding row is nobody's candidate
    row_max = jax.lax.stop_gradient(_masked_row_max(s, cols, jnp.diagonal(s)))[:, None]
    logits = (s - row_max) / temperature
    eye = jnp.eye(b, dtype=bool)
    same = (labels[:, None] == labels[None, :]) & cols
    all_mask = cols
    if level != "batch":
        in_group = group_ids[:, None] == group_ids[None, :]
        same = same & in_group
        if level == "group":
            all_mask = all_mask & in_group
    n_same = jnp.sum(same, axis=-1)
    n_pos = n_same - valid  # Same minus self (self is in Same when it is valid)
    n_neg = jnp.sum(all_mask, axis=-1) - n_same
    pos = same & ~eye
    denom = all_mask & ~eye
    log_denom = jnp.log(_sum_where(denom, jnp.exp(logits)) + EPS)
    return logits, pos, n_pos, n_neg, log_denom


def _group_rows(z, labels, valid, sim, temperature, group_size):
    """Blockwise group level on [P, G, D]: O(B*G*D). Rows come back flattened to [B, G]."""
    b, d = z.shape
    p, g = b // group_size, group_size
    zb = z.reshape(p, g, d)
    yb = labels.reshape(p, g)
    vb = valid.reshape(p, g)
    cols = jnp.broadcast_to(vb[:, None, :], (p, g, g))  # a padding row is nobody's candidate
    s = sim.fn(zb, zb)  # [P, G, G]
    if sim.max_at_self:
        # the block holds self, and self holds the full-row max
        row_max = _masked_row_max(s, cols, jnp.diagonal(s, axis1=-2, axis2=-1))
    else:
        row_max = _full_row_max(z, valid, sim, group_size).reshape(p, g)
    logits = (s - jax.lax.stop_gradient(row_max)[..., None]) / temperature
    eye = jnp.eye(g, dtype=bool)
    same = (yb[..., :, None] == yb[..., None, :]) & cols
    n_same = jnp.sum(same, axis=-1)
    n_pos = n_same - vb
    n_neg = jnp.sum(cols, axis=-1) - n_same
    pos = same & ~eye
    log_denom = jnp.log(_sum_where(cols & ~eye, jnp.exp(logits)) + EPS)
    return (logits.reshape(b, g), pos.reshape(b, g), n_pos.reshape(b), n_neg.reshape(b), log_denom.reshape(b))


@functools.partial(jax.jit, static_argnames=("loss_type", "level", "similarity", "group_size", "dense"))
def _contrastive_loss_impl(
    embeddings,
    labels,
    group_ids,
    temperature,
    masked_label,
    skip_trivial,
    rng,
    valid,
    *,
    loss_type,
    level,
    similarity,
    group_size,
    dense,
):
    sim = SIMILARITIES[similarity]
    spec = LOSSES[loss_type]
    z = embeddings.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    valid = valid.astype(bool)
    if level == "group" and not dense:
        logits, pos, n_pos, n_neg, log_denom = _group_rows(z, labels, valid, sim, temperature, group_size)
    else:
        logits, pos, n_pos, n_neg, log_denom = _dense_rows(z, labels, group_ids, valid, level, sim, temperature)
    sampled = None
    if spec.samples_positive:
        # Draw the rank k_i of the positive among P(i) in column order. Column order inside a
        # group is the same in the blockwise and the dense layout, so both paths pick the same
        # positive from the same key, and only B random numbers are drawn.
        k = jax.random.randint(rng, (z.shape[0],), 0, jnp.maximum(n_pos, 1))
        rank = jnp.cumsum(pos, axis=-1)
        sampled = pos & (rank == (k + 1)[:, None])
    rows = AnchorRows(logits, pos, n_pos.astype(jnp.float32), log_denom, sampled)
    loss = spec.fn(rows)
    nontrivial = (n_pos >= 1) & (n_neg >= 1)
    keep = valid & (labels != masked_label) & (nontrivial | jnp.logical_not(skip_trivial))
    per_sample = jnp.where(keep, loss, 0.0)
    batch_loss = jnp.sum(per_sample) / (jnp.sum(keep.astype(jnp.float32)) + EPS)
    return per_sample, batch_loss


def contrastive_loss(
    embeddings,
    labels,
    group_ids,
    *,
    loss_type: str = "infonce",
    level: str = "group",
    temperature: float = 0.05,
    masked_label: int = 0,
    skip_trivial: bool = True,
    similarity: str = "cosine",
    rng=None,
    group_size: int | None = None,
    dense: bool = False,
    valid=None,
):
    """CLIPO supervised contrastive loss (CLIPO paper, arXiv 2603.10101: the supervised contrastive loss). Pure and jittable.

    Args:
      embeddings: [B, D] unit-norm rows (head_apply's output).
      labels: [B] int, 1 = correct, 0 = incorrect.
      group_ids: [B] prompt id; groups contiguous and equal-sized (arange(P).repeat(G)) for the
        blockwise path.
      loss_type: key of LOSSES. level: group | cross | batch. similarity: key of SIMILARITIES.
      temperature: tau. masked_label: anchors with this label are excluded (-1 keeps all); they
        still act as negatives. skip_trivial: drop anchors without a positive or a negative.
      rng: PRNG key, required by sampling losses (infonce).
      group_size: static G. Needed for the blockwise group path under jit; inferred from concrete
        group_ids otherwise.
      dense: force the BxB formulation (reference layout) at group level.
      valid: optional [B] bool; False rows (e.g. DAPO's padding copies) are neither anchors nor
        candidates: the result equals the loss over the valid rows alone, with 0 at the others.
    Returns:
      (per_sample [B] float32 = L_i * m_i, batch_loss scalar = sum L_i / (sum m_i + eps)).
    """
    _check_options(loss_type, level, similarity, temperature)
    embeddings, labels, group_ids = map(jnp.asarray, (embeddings, labels, group_ids))
    _check_shapes(embeddings, labels, group_ids)
    if LOSSES[loss_type].samples_positive and rng is None:
        raise ContrastiveError(f"loss_type={loss_type!r} draws a positive: pass rng=<PRNG key>")
    if level == "group" and not dense:
        if group_size is None:
            if not _is_concrete(group_ids):
                raise ContrastiveError("group_size is required for level='group' under jit (or pass dense=True)")
            group_size = infer_group_size(group_ids)
        _check_group_ids(group_ids, group_size)
    else:
        group_size = None  # unused by the dense path; keeps the jit cache small
    if rng is None:
        rng = jax.random.key(0)  # unused by non-sampling losses
    valid = jnp.ones(labels.shape, bool) if valid is None else jnp.asarray(valid, bool)
    if valid.shape != labels.shape:
        raise ContrastiveError(f"valid must be [B]={list(labels.shape)}, got shape {valid.shape}")
    return _contrastive_loss_impl(
        embeddings,
        labels,
        group_ids,
        jnp.float32(temperature),
        jnp.int32(masked_label),
        jnp.bool_(skip_trivial),
        rng,
        valid,
        loss_type=loss_type,
        level=level,
        similarity=similarity,
        group_size=group_size,
        dense=dense,
    )


def contrastive_reward(per_sample, labels, *, lam: float = 0.2, c0: float = 0.0, clip_min: float = -0.5):
    """c_i = max(c0 - lam * L_i * [y_i = 1], clip_min), [B]. Add it to the outcome reward r_i."""
    per_sample = jnp.asarray(per_sample, jnp.float32)
    correct = (jnp.asarray(labels) == 1).astype(jnp.float32)
    return jnp.maximum(c0 - lam * per_sample * correct, clip_min)


# ----------------------------------------------------------------------------------------------
# Head
# ----------------------------------------------------------------------------------------------
def _init_kernel(rng, fan_in, fan_out):
    # Same distribution as torch.nn.Linear's default (the reference's head): U(+-1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rng, (fan_in, fan_out), jnp.float32, -bound, bound)


def _init_linear(rng, hidden, d_out):
    return {"proj": {"kernel": _init_kernel(rng, hidden, d_out)}}


def _init_mlp(rng, hidden, d_out):
    k1, k2 = jax.random.split(rng)
    return {"hidden": {"kernel": _init_kernel(k1, hidden, hidden)}, "proj": {"kernel": _init_kernel(k2, hidden, d_out)}}


def _apply_linear(params, x):
    return x @ params["proj"]["kernel"]


def _apply_mlp(params, x):
    return jax.nn.relu(x @ params["hidden"]["kernel"]) @ params["proj"]["kernel"]


# kind -> (init(rng, hidden, d_out) -> params, apply(params, x[B, H]) -> [B, d_out] unnormalised)
HEADS: dict[str, tuple[Callable, Callable]] = {
    "linear": (_init_linear, _apply_linear),
    "mlp": (_init_mlp, _apply_mlp),
}


def _head_kind(params) -> str:
    return "mlp" if "hidden" in params else "linear"


def init_head(rng, hidden: int, d_out: int, kind: str = "linear"):
    """Head params pytree. linear: Dense(H->d) no bias; mlp: Dense(H->H) ReLU Dense(H->d)."""
    if kind not in HEADS:
        raise ContrastiveError(f"head kind={kind!r} is not one of {sorted(HEADS)}")
    return HEADS[kind][0](rng, hidden, d_out)


def save_head(path: str, params) -> None:
    """Writes the head's parameters to a safetensors file (keys ``proj.kernel``, ``hidden.kernel``),
    through a temporary file and a rename, so a reader never sees a half-written head."""
    import os

    from safetensors.numpy import save_file

    flat = {f"{layer}.{name}": np.asarray(v, np.float32) for layer, d in params.items() for name, v in d.items()}
    tmp = f"{path}.tmp"
    save_file(flat, tmp, metadata={"format": "clipo_jax.head", "kind": _head_kind(params)})
    os.replace(tmp, path)


def load_head(path: str, hidden: int, cfg: "ContrastiveConfig"):
    """Head parameters from a file written by save_head, checked against the run: the head kind,
    every shape (hidden -> d_out) and finite values. Raises ContrastiveError with a one-line reason."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        flat = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ContrastiveError(f"head file {path}: cannot read it ({e})") from None
    want = jax.tree.map(lambda x: x.shape, init_head(jax.random.key(0), hidden, cfg.d_out, cfg.head))
    want_flat = {f"{layer}.{name}": shape for layer, d in want.items() for name, shape in d.items()}
    if set(flat) != set(want_flat):
        raise ContrastiveError(
            f"head file {path}: tensors {sorted(flat)} do not make a {cfg.head!r} head (want {sorted(want_flat)})"
        )
    for key, shape in want_flat.items():
        if flat[key].shape != tuple(shape):
            raise ContrastiveError(
                f"head file {path}: {key} has shape {flat[key].shape}, this run needs {tuple(shape)} "
                f"(hidden {hidden} -> d_out {cfg.d_out})"
            )
        if not np.all(np.isfinite(flat[key])):
            raise ContrastiveError(f"head file {path}: {key} has NaN or inf values")
    params: dict[str, dict[str, Array]] = {}
    for key, value in flat.items():
        layer, name = key.split(".", 1)
        params.setdefault(layer, {})[name] = jnp.asarray(value, jnp.float32)
    return params


def head_apply(params, pooled, kind: str | None = None):
    """pooled [B, H] (stop-gradient data) -> z [B, d_out], L2-normalised rows, float32."""
    x = jax.lax.stop_gradient(jnp.asarray(pooled)).astype(jnp.float32)
    y = HEADS[kind or _head_kind(params)][1](params, x)
    # max(|y|, eps) taken under the sqrt: a zero row (a one-token response has no decode state to
    # pool, and the head has no bias) then has a finite gradient, as torch's F.normalize gives;
    # sqrt'(0) = inf would turn the whole head's gradient into NaN.
    norm = jnp.sqrt(jnp.maximum(jnp.sum(y * y, axis=-1, keepdims=True), NORMALIZE_EPS**2))
    return y / norm


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """Static options of the CLIPO head step (hashable: it is a jit static argument)."""

    loss_type: str = "infonce"
    level: str = "group"
    temperature: float = 0.05
    masked_label: int = 0
    skip_trivial: bool = True
    similarity: str = "cosine"
    group_size: int | None = None  # required for level='group' (blockwise) inside head_step
    head: str = "linear"
    d_out: int = 512
    fixed_head: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    adam_eps: float = 1e-8

    def validate(self) -> "ContrastiveConfig":
        _check_options(self.loss_type, self.level, self.similarity, self.temperature)
        if self.head not in HEADS:
            raise ContrastiveError(f"head={self.head!r} is not one of {sorted(HEADS)}")
        if self.level == "group" and not self.group_size:
            raise ContrastiveError("group_size must be set for level='group'")
        if self.d_out <= 0:
            raise ContrastiveError(f"d_out={self.d_out} must be > 0")
        return self


@struct.dataclass
class HeadState:
    """Checkpointable head state (a pytree of arrays): params, AdamW state, step counter."""

    params: Any
    opt_state: Any
    step: Array


def head_optimizer(cfg: ContrastiveConfig) -> optax.GradientTransformation:
    """AdamW as in the reference: no schedule, no clipping."""
    return optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def head_state_from_params(params, cfg: ContrastiveConfig) -> HeadState:
    """A fresh optimizer around given head parameters (e.g. from load_head)."""
    return HeadState(params, head_optimizer(cfg).init(params), jnp.zeros((), jnp.int32))


def init_head_state(rng, hidden: int, cfg: ContrastiveConfig) -> HeadState:
    cfg.validate()
    params = init_head(rng, hidden, cfg.d_out, cfg.head)
    return HeadState(params, head_optimizer(cfg).init(params), jnp.zeros((), jnp.int32))


def _head_loss(params, pooled, labels, group_ids, rng, valid, cfg):
    z = head_apply(params, pooled, cfg.head)
    per_sample, loss = _contrastive_loss_impl(
        z,
        labels,
        group_ids,
        jnp.float32(cfg.temperature),
        jnp.int32(cfg.masked_label),
        jnp.bool_(cfg.skip_trivial),
        rng,
        valid,
        loss_type=cfg.loss_type,
        level=cfg.level,
        similarity=cfg.similarity,
        group_size=cfg.group_size if cfg.level == "group" else None,
        dense=False,
    )
    return loss, per_sample


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(0,))
def _head_step_impl(state, pooled, labels, group_ids, rng, valid, cfg):
    (loss, per_sample), grads = jax.value_and_grad(_head_loss, has_aux=True)(
        state.params, pooled, labels, group_ids, rng, valid, cfg
    )
    metrics = {
        "contrastive/loss": loss,
        "contrastive/head_grad_norm": optax.tree.norm(grads),
        "contrastive/num_anchors": jnp.sum(per_sample != 0),
    }
    if cfg.fixed_head:
        new_state = state.replace(step=state.step + 1)
    else:
        updates, opt_state = head_optimizer(cfg).update(grads, state.opt_state, state.params)
        new_state = HeadState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
    return new_state, per_sample, loss, metrics


def head_step(head_state: HeadState, pooled, labels, group_ids, rng, cfg: ContrastiveConfig, valid=None):
    """One online head update (jitted; head_state is donated).

    pooled [B, H] stop-gradient pooled hidden states; labels [B]; group_ids [B] contiguous,
    groups of cfg.group_size; rng: PRNG key for the InfoNCE draw; valid: optional [B] bool, False
    on rows that must not train the head (DAPO's padding copies).
    Returns (new_head_state, per_sample [B] -- the losses BEFORE the update, which drive the
    reward --, batch_loss, metrics). With cfg.fixed_head only the step counter advances.
    metrics['contrastive/num_anchors'] counts anchors with a nonzero loss.
    """
    cfg.validate()
    group_ids = jnp.asarray(group_ids)
    if cfg.level == "group":
        _check_group_ids(group_ids, cfg.group_size)
    valid = jnp.ones(group_ids.shape, bool) if valid is None else jnp.asarray(valid, bool)
    return _head_step_impl(head_state, pooled, labels, group_ids, rng, valid, cfg)


# ----------------------------------------------------------------------------------------------
# Metrics (CLIPO paper, arXiv 2603.10101: the reference's logged metrics)
# ----------------------------------------------------------------------------------------------
def _masked_stats(values, mask, prefix, out):
    """mean/max/min of values over mask (0 when empty) and the count."""
    values = values.astype(jnp.float32)
    count = jnp.sum(mask)
    nonempty = count > 0
    out[f"{prefix}/mean"] = jnp.where(nonempty, jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1), 0.0)
    out[f"{prefix}/max"] = jnp.where(nonempty, jnp.max(jnp.where(mask, values, -jnp.inf)), 0.0)
    out[f"{prefix}/min"] = jnp.where(nonempty, jnp.min(jnp.where(mask, values, jnp.inf)), 0.0)
    return count


def _pair_geometry(x):
    """x [..., n, D] -> (cosine [..., n, n], l2 distance [..., n, n]) via the Gram matrix."""
    x = x.astype(jnp.float32)
    gram = _dot(x, x)
    sq = jnp.diagonal(gram, axis1=-2, axis2=-1)
    norm = jnp.sqrt(sq)
    cos = gram / jnp.maximum(norm[..., :, None] * norm[..., None, :], NORMALIZE_EPS)
    l2 = jnp.sqrt(jnp.maximum(sq[..., :, None] + sq[..., None, :] - 2.0 * gram, 0.0))
    return cos, l2


def _geometry(spaces, y, masks, out, prefix):
    """spaces: {name: x[..., n, D]}; masks: {name: bool[..., n, n] over pairs i<j}."""
    geo = {name: _pair_geometry(x) for name, x in spaces.items()}
    for mask_name, mask in masks.items():
        for space, (cos, l2) in geo.items():
            _masked_stats(cos, mask, f"{prefix}/{mask_name}/{space}_cos", out)
            count = _masked_stats(l2, mask, f"{prefix}/{mask_name}/{space}_l2", out)
        out[f"{prefix}/{mask_name}/pairs"] = count


def _label_pair_masks(y, upper):
    c = y == 1
    return {
        "correct_correct": upper & c[..., :, None] & c[..., None, :],
        "incorrect_incorrect": upper & ~c[..., :, None] & ~c[..., None, :],
        "mixed": upper & (c[..., :, None] != c[..., None, :]),
    }


@functools.partial(jax.jit, static_argnames=("prefix",))
def _label_metrics_impl(labels, lengths, per_sample, reward, valid, *, prefix):
    out: dict[str, Array] = {}
    correct = (labels == 1) & valid
    incorrect = (labels != 1) & valid
    for name, mask in (("correct", correct), ("incorrect", incorrect)):
        out[f"{prefix}count/{name}"] = _masked_stats(per_sample, mask, f"{prefix}loss/{name}", out)
        _masked_stats(lengths, mask, f"{prefix}length/{name}", out)
    for name, mask in (("all", valid), ("correct", correct), ("incorrect", incorrect)):
        _masked_stats(reward, mask, f"{prefix}reward/{name}", out)
    return out


@functools.partial(jax.jit, static_argnames=("group_size", "dense_geometry", "prefix"))
def _geometry_impl(pooled, z, labels, lengths, valid, *, group_size, dense_geometry, prefix):
    out: dict[str, Array] = {}
    b = labels.shape[0]
    p, g = b // group_size, group_size
    vb = valid.reshape(p, g)
    # Group-restricted geometry, blockwise: O(B*G*(H+d)) compute, O(B*G) memory.
    upper_g = jnp.triu(jnp.ones((g, g), bool), k=1) & vb[:, :, None] & vb[:, None, :]
    _geometry(
        {"pooled": pooled.reshape(p, g, -1), "head": z.reshape(p, g, -1)},
        labels.reshape(p, g),
        {f"group_{k}": v for k, v in _label_pair_masks(labels.reshape(p, g), upper_g).items()},
        out,
        f"{prefix}geometry",
    )
    if dense_geometry:
        # All pairs: O(B^2*(H+d)) compute, O(B^2) memory -- disable for large B.
        upper = jnp.triu(jnp.ones((b, b), bool), k=1) & valid[:, None] & valid[None, :]
        masks = _label_pair_masks(labels, upper)
        # length quartiles over the valid rows (padding rows pushed past the top quartile edge)
        lf = lengths.astype(jnp.float32)
        q = jnp.nanquantile(jnp.where(valid, lf, jnp.nan), jnp.array([0.25, 0.5, 0.75]))
        bucket = jnp.sum(lf[:, None] > q[None, :], axis=-1)
        for k in range(4):
            inb = bucket == k
            masks[f"length_q{k + 1}"] = upper & inb[:, None] & inb[None, :]
        _geometry({"pooled": pooled, "head": z}, labels, masks, out, f"{prefix}geometry")
    return out


def _valid_or_all(valid, labels):
    return jnp.ones(labels.shape, bool) if valid is None else jnp.asarray(valid, bool)


def contrastive_label_metrics(labels, lengths, per_sample, reward, *, valid=None, prefix: str = "clipo/"):
    """Per-label CLIPO metrics, O(B): {prefix}loss|length/{correct,incorrect}/{mean,max,min},
    {prefix}count/{correct,incorrect}, {prefix}reward/{all,correct,incorrect}/{mean,max,min}, over
    the valid rows (valid: optional [B] bool; DAPO's padding copies are not valid)."""
    labels = jnp.asarray(labels)
    return _label_metrics_impl(
        labels,
        jnp.asarray(lengths),
        jnp.asarray(per_sample),
        jnp.asarray(reward),
        _valid_or_all(valid, labels),
        prefix=prefix,
    )


def contrastive_geometry(
    pooled, z, labels, group_ids, lengths, *, group_size=None, dense_geometry=True, valid=None, prefix="clipo/"
):
    """Embedding geometry (see contrastive_metrics) over pairs of valid rows."""
    labels, group_ids = jnp.asarray(labels), jnp.asarray(group_ids)
    if group_size is None:
        if not _is_concrete(group_ids):
            raise ContrastiveError("group_size is required under jit")
        group_size = infer_group_size(group_ids)
    _check_group_ids(group_ids, group_size)
    return _geometry_impl(
        jnp.asarray(pooled),
        jnp.asarray(z),
        labels,
        jnp.asarray(lengths),
        _valid_or_all(valid, labels),
        group_size=group_size,
        dense_geometry=dense_geometry,
        prefix=prefix,
    )


def contrastive_metrics(
    pooled,
    z,
    labels,
    group_ids,
    lengths,
    per_sample,
    reward,
    *,
    group_size: int | None = None,
    dense_geometry: bool = True,
    prefix: str = "clipo/",
    valid=None,
) -> dict[str, Array]:
    """Per-step CLIPO metrics (CLIPO paper, arXiv 2603.10101: the reference's logged metrics) as scalars:
    contrastive_label_metrics and contrastive_geometry together.

    pooled [B, H] raw pooled hidden; z [B, d] head outputs; labels [B] (1 correct); group_ids [B]
    contiguous equal groups; lengths [B] response lengths; per_sample [B] contrastive losses;
    reward [B] contrastive rewards c_i; valid: optional [B] bool (rows counted).
    Keys: {prefix}loss|length/{correct,incorrect}/{mean,max,min}, {prefix}count/...,
    {prefix}reward/{all,correct,incorrect}/..., and
    {prefix}geometry/{mask}/{pooled,head}_{cos,l2}/{mean,max,min} + {prefix}geometry/{mask}/pairs
    over pairs i<j for masks correct_correct, incorrect_incorrect, mixed, the same prefixed group_
    (pairs inside a group; blockwise, O(B*G*(H+d))), and length_q1..q4 (both responses in that
    length quartile of the batch). The non-group masks build BxB matrices (O(B^2*(H+d)) compute):
    pass dense_geometry=False for large B. Empty sets report 0 with count/pairs 0. L2 distances
    use the Gram identity (cheap; absolute error ~sqrt(float eps)*norm for near-duplicates).
    """
    out = contrastive_label_metrics(labels, lengths, per_sample, reward, valid=valid, prefix=prefix)
    out.update(
        contrastive_geometry(
            pooled,
            z,
            labels,
            group_ids,
            lengths,
            group_size=group_size,
            dense_geometry=dense_geometry,
            valid=valid,
            prefix=prefix,
        )
    )
    return out


# ----------------------------------------------------------------------------------------------
# The trainer's contrastive stage
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "group_size", "log_geometry"), donate_argnums=(0,))
def _clipo_stage_impl(head, pooled, labels, lengths, valid, rng, lam, c0, clip_min, *, cfg, group_size, log_geometry):
    # One program for the whole stage: on a GPU each separate dispatch and host check cost more
    # than the head step itself.
    group_ids = jnp.arange(labels.shape[0], dtype=jnp.int32) // group_size
    metrics: dict[str, Array] = {}
    if log_geometry:  # with the head before its update, as the authors' code logs it
        z = head_apply(head.params, pooled, cfg.head)
        metrics.update(
            _geometry_impl(
                pooled, z, labels, lengths, valid, group_size=group_size, dense_geometry=True, prefix="clipo/"
            )
        )
    head, per_sample, _, head_metrics = _head_step_impl(head, pooled, labels, group_ids, rng, valid, cfg)
    reward = contrastive_reward(per_sample, labels, lam=lam, c0=c0, clip_min=clip_min)
    metrics.update(head_metrics)
    metrics.update(_label_metrics_impl(labels, lengths, per_sample, reward, valid, prefix="clipo/"))
    return head, reward, metrics


def clipo_stage(head: HeadState, out, labels, group_size: int, rng, cfg: ContrastiveConfig, opts, place, valid=None):
    """One step of CLIPO in the trainer: the head's per-sample losses before its update become
    the contrastive reward of each correct response, then the head takes its step.

    out: the rollout's SampleOutput (pooled_hidden [B, H], lengths [B]); labels: int [B] (1 =
    correct), rows in contiguous groups of group_size; opts: lam, c0, clip_min, log_geometry,
    head_on_padding; place: host arrays -> replicated device arrays; valid: [B] bool, False on
    DAPO's padding copies, which neither train the head nor enter its metrics (unless
    opts.head_on_padding). Returns (new head, reward float32 [B] on the host, metrics dict of
    floats). The per-label metrics are always logged (O(B)); the geometry (opts.log_geometry) is
    taken with the head before its update, as the authors' code logs it. One jitted call per step;
    the reward and the metrics come back in two transfers.
    """
    cfg.validate()
    labels = np.asarray(labels)
    if group_size <= 0 or labels.shape[0] % group_size:
        raise ContrastiveError(f"group_size={group_size} does not divide batch size {labels.shape[0]}")
    if cfg.level == "group" and cfg.group_size != group_size:
        raise ContrastiveError(
            f"ContrastiveConfig.group_size={cfg.group_size} but the rollout groups have {group_size}"
        )
    if valid is None or getattr(opts, "head_on_padding", False):
        valid = np.ones(len(labels), bool)
    valid = np.asarray(valid, bool)
    pooled, labels_d, lengths_d, valid_d, rng_d = place((out.pooled_hidden, labels, out.lengths, valid, rng))
    head, reward_d, metrics_d = _clipo_stage_impl(
        head,
        pooled,
        labels_d,
        lengths_d,
        valid_d,
        rng_d,
        np.float32(opts.lam),
        np.float32(opts.c0),
        np.float32(opts.clip_min),
        cfg=cfg,
        group_size=group_size,
        log_geometry=bool(opts.log_geometry),
    )
    c_reward = np.asarray(reward_d)
    m = parallel.scalars_to_host(metrics_d)
    if valid.any():  # a step of DAPO padding copies only has no mean to report
        m["contrastive/reward_mean"] = float(c_reward[valid].mean())
    return head, c_reward, m
