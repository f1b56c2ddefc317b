"""Building blocks shared by the towers: partitioned dense/LayerNorm, multi-head attention, remat.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, `vocab`, `norm`, ...) and
activations carry logical constraints (`act_batch`, `act_len`, `act_embed`, `act_heads`, ...);
`kosmos2_jax.train.sharding` maps both to a device mesh.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
_INIT = nn.initializers.normal(0.02)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_new":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}")


class Dense(nn.Module):
    """`nn.Dense` with logical axis names on kernel [in, out] and bias [out]."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = _INIT

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        # A 2-D matmul (and bias) on [B*T, D]: XLA:CPU runs the gradients of a [B, T, D] dot,
        # contracting over B and T, ~1.6x slower than the same contraction on the flattened rows.
        y = jnp.dot(x.astype(self.dtype).reshape(-1, x.shape[-1]), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y.reshape(*x.shape[:-1], self.features)


def layer_norm(eps: float, axis_name: str = "norm", dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    """LayerNorm computed like torch (two-pass variance), statistics in float32."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)),
                        name=name)


def fused_attention(q, k, v, mask, causal: bool, impl: str):
    """`jax.nn.dot_product_attention` on [B, len, heads, head_dim] inputs with q already scaled
    (HF's order, hence scale=1), odd lengths padded to even ones.

    The padding is for cuDNN: JAX's training rule for its fused kernel (through JAX 0.11) sees a
    bias even when there is none, and with a bias it rejects odd lengths, such as CLIP's 257
    tokens. The extra key is hidden by `key_value_seq_lengths`, the extra query row is dropped. The
    `xla` path pads the same way, so the CPU tests run the lines cuDNN runs.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    pad_q, pad_kv = q_len % 2, kv_len % 2
    kv_lengths = None
    if pad_q or pad_kv:
        pad = lambda t, n: jnp.pad(t, ((0, 0), (0, n), (0, 0), (0, 0)))
        q, k, v = pad(q, pad_q), pad(k, pad_kv), pad(v, pad_kv)
        kv_lengths = jnp.full((q.shape[0],), kv_len, jnp.int32)
        if mask is not None:  # the extra query row sees every key, so that no row is empty
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, pad_kv)), constant_values=True)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, is_causal=causal,
                                       key_value_seq_lengths=kv_lengths, implementation=impl)
    return out[:, :q_len]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (all with bias), query scaled by
    head_dim^-0.5 after its projection, softmax in float32, and an optional LayerNorm on the
    merged heads before `out_proj` (MAGNETO's sub-LN, `inner_attn_ln`).

    `bias` is an additive mask broadcastable to [batch, heads, q_len, kv_len], 0 where a key is
    visible and <= the float32 minimum where it is masked; `causal=True` says it includes the causal
    mask. With `decode=True` keys and values are written into the `cache` collection at
    `cache_index` and the queries attend over the whole cache (the caller's `bias` covers the cache
    length).

    `impl` (config.ATTENTION_IMPLS): "einsum" computes the scores itself, as HF does; "xla" and
    "cudnn" hand q, k, v and the mask to `jax.nn.dot_product_attention` (not when decoding), where
    "cudnn" is the fused flash-attention kernel that skips the causal upper triangle. The query
    rows that see no key at all (padding) then come out differently from HF's; the others agree.
    """

    num_heads: int
    inner_layer_norm_eps: float | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "einsum"

    @nn.compact
    def __call__(self, x, kv=None, bias=None, deterministic: bool = True, decode: bool = False,
                 causal: bool = False):
        kv = x if kv is None else kv
        width = x.shape[-1]
        head_dim = width // self.num_heads
        dense = lambda name, axes=("embed", "heads"): Dense(width, axes, dtype=self.dtype,
                                                            param_dtype=self.param_dtype, name=name)
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, head_dim)
        q = split(dense("q_proj")(x) * head_dim ** -0.5)
        k = split(dense("k_proj")(kv))
        v = split(dense("v_proj")(kv))
        q = constrain(q, ("act_batch", "act_len", "act_heads", None))
        if decode:
            k, v = self._update_cache(k, v)
        if self.impl == "einsum" or decode:
            out = self._einsum_attention(q, k, v, bias, deterministic)
        else:
            if self.dropout > 0.0 and not deterministic:
                raise ValueError(f"attention_impl={self.impl!r} has no attention dropout "
                                 f"(jax.nn.dot_product_attention); set the towers' attention_dropout to 0.0 "
                                 f"or use attention_impl='einsum'")
            mask = None if bias is None else bias == 0  # [B, 1, q_len, kv_len]
            out = fused_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, causal, self.impl)
        out = out.reshape(*x.shape[:2], width)
        out = constrain(out, ("act_batch", "act_len", "act_heads"))
        if self.inner_layer_norm_eps is not None:
            out = layer_norm(self.inner_layer_norm_eps, "heads", self.dtype, self.param_dtype, name="inner_attn_ln")(out)
        return Dense(width, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(out)

    def _einsum_attention(self, q, k, v, bias, deterministic):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1)
        if self.dropout > 0.0 and not deterministic:
            weights = nn.Dropout(self.dropout)(weights, deterministic=False)
        return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)

    def _update_cache(self, k, v):
        """Write this step's keys/values at `cache_index`; the cache is created by `init` with the
        full decoding length (the length of the input used to initialize it)."""
        is_init = not self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if is_init:
            return k, v
        start = (0, index.value, 0, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), start)
        index.value = index.value + k.shape[1]
        return cached_k.value, cached_v.value


def remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


def stack_layers(block_cls: type[nn.Module], num_layers: int, remat: str, scan: bool, name: str, **block_kwargs):
    """`num_layers` copies of `block_cls`: `nn.scan`ned (params and cache stacked on a leading
    `layers` axis) or a Python loop, with an optional `nn.remat` policy. Call the result as
    `(x, args)` with `args` a tuple of arrays shared by every layer; blocks take `(x, *args)`."""
    block = block_cls
    if remat != "none":
        block = nn.remat(block, policy=remat_policy(remat), prevent_cse=not scan)
    if scan:
        scanned = nn.scan(
            _ScanAdapter, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast, length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        return scanned(block=block, block_kwargs=tuple(block_kwargs.items()), name=name)
    return _Loop(block=block, num_layers=num_layers, block_kwargs=tuple(block_kwargs.items()), name=name)


class _ScanAdapter(nn.Module):
    block: Any
    block_kwargs: tuple

    @nn.compact
    def __call__(self, x, args):
        return self.block(**dict(self.block_kwargs), name="layer")(x, *args), None


class _Loop(nn.Module):
    block: Any
    num_layers: int
    block_kwargs: tuple

    @nn.compact
    def __call__(self, x, args):
        for i in range(self.num_layers):
            x = self.block(**dict(self.block_kwargs), name=f"layer_{i}")(x, *args)
        return x, None
