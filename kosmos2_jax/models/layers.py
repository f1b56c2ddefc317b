"""Building blocks shared by the towers: partitioned dense/LayerNorm, multi-head attention, remat.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, `vocab`, `norm`, ...) and
activations carry logical constraints (`act_batch`, `act_len`, `act_embed`, `act_heads`, ...);
`kosmos2_jax.models.sharding` maps both to a device mesh.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from kosmos2_jax.models.sharding import spec_for
from kosmos2_jax.utils.errors import UsageError

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
    raise UsageError(f"unknown activation {name!r}")


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
        # promote_dtype rather than astype: Qwix's QLoRA sees a quantized kernel through it (train/lora.py)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        # (astype: Qwix's LoRA adds a float32 delta to a bfloat16 product)
        y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel).astype(self.dtype)
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


def fused_attention(q, k, v, mask, causal: bool, impl: str, lengths=None):
    """`jax.nn.dot_product_attention` on [B, len, heads, head_dim] inputs with q already scaled
    (HF's order, hence scale=1), odd lengths padded to even ones. `lengths` [B]: each row's tokens
    are its first `lengths` (right padding), given to the kernel as sequence lengths, not a mask.

    The padding is for cuDNN: JAX's training rule for its fused kernel (through JAX 0.11) sees a
    bias even when there is none, and with a bias it rejects odd lengths, such as CLIP's 257
    tokens. The extra key is hidden by `key_value_seq_lengths`, the extra query row is dropped. The
    `xla` path pads the same way, so the CPU tests run the lines cuDNN runs.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    pad_q, pad_kv = q_len % 2, kv_len % 2
    q_lengths = kv_lengths = None if lengths is None else lengths.astype(jnp.int32)
    if pad_q or pad_kv:
        pad = lambda t, n: jnp.pad(t, ((0, 0), (0, n), (0, 0), (0, 0)))
        q, k, v = pad(q, pad_q), pad(k, pad_kv), pad(v, pad_kv)
        if kv_lengths is None:
            kv_lengths = jnp.full((q.shape[0],), kv_len, jnp.int32)
        if mask is not None:  # the extra query row sees every key, so that no row is empty
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, pad_kv)), constant_values=True)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, is_causal=causal,
                                       query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths,
                                       implementation=impl)
    return out[:, :q_len]


def mesh_platform(mesh) -> str | None:
    """The platform of an abstract mesh's devices ("tpu" for a described slice), None without one."""
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None)


SPLASH_BLOCK = 512  # the largest splash block; shorter sequences are padded to a multiple of 128


def splash_attention(q, k, v, causal: bool, segment_ids=None, interpret: bool | None = None):
    """Pallas splash attention (TPU) on [B, len, heads, head_dim] self-attention inputs with q
    already scaled: a causal flag and `segment_ids` [B, len] (0 = padding), no mask array.

    Lengths are padded to a multiple of the block size (CLIP's 257 tokens -> 384), the padding
    segment 0 as padding tokens are, so no real query sees it. Under a mesh (`jax.set_mesh`) the kernel runs per
    device in a `shard_map` over the activations' batch and head shardings (the logical rules in
    force); splash has no sequence sharding. `interpret` (default: off on TPU) runs the same kernel
    in Pallas's interpreter, as on CPU in the tests.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, length, heads, _ = q.shape
    if k.shape[1] != length:
        raise UsageError(f"attention_impl='splash' is for self-attention, got {length} queries and {k.shape[1]} keys")
    block = min(SPLASH_BLOCK, -(-length // 128) * 128)
    padded = -(-length // block) * block
    segments = jnp.ones((b, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if padded != length:
        pad = lambda t: jnp.pad(t, ((0, 0), (0, padded - length)) + ((0, 0),) * (t.ndim - 2))
        q, k, v, segments = pad(q), pad(k), pad(v), pad(segments)
    mesh = jax.sharding.get_abstract_mesh()
    if interpret is None:  # the mesh's platform: compiling for a TPU slice from a CPU host is not interpreting
        interpret = (mesh_platform(mesh) or jax.default_backend()) != "tpu"
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def local(q, k, v, segments):  # one device's [b, len, heads, d]
        shape = (padded, padded)
        one = splash.CausalMask(shape) if causal else splash.FullMask(shape)
        kernel = splash.make_splash_mha(splash.MultiHeadMask([one] * q.shape[2]), head_shards=1, q_seq_shards=1,
                                        block_sizes=sizes, interpret=interpret)
        per_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
        heads_first = lambda t: jnp.swapaxes(t, 1, 2)
        return heads_first(jax.vmap(per_row)(heads_first(q), heads_first(k), heads_first(v), segments))

    if mesh.empty or mesh.size == 1:
        out = local(q, k, v, segments)
    else:
        rules = nn.get_logical_axis_rules()
        spec = spec_for(q.shape, ("act_batch", None, "act_heads", None), mesh, rules)
        seg_spec = jax.sharding.PartitionSpec(spec[0], None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec,
                            check_vma=False)(q, k, v, segments)
    return out[:, :length]


def masked_attention(q, k, v, causal: bool, segment_ids, lengths, impl: str):
    """Self-attention without a dense bias: the causal flag, and either `segment_ids` [B, len]
    (packed rows: a query sees its own segment) or `lengths` [B] (right-padded rows) or neither."""
    if impl == "splash":
        if segment_ids is None and lengths is not None:
            segment_ids = (jnp.arange(q.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
        return splash_attention(q, k, v, causal, segment_ids)
    mask = None
    if segment_ids is not None:  # no segment ids in jax.nn.dot_product_attention: a boolean mask
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return fused_attention(q, k, v, mask, causal, impl, lengths)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (all with bias), query scaled by
    head_dim^-0.5 after its projection, softmax in float32, and an optional LayerNorm on the
    merged heads before `out_proj` (MAGNETO's sub-LN, `inner_attn_ln`).

    `bias` is an additive mask broadcastable to [batch, heads, q_len, kv_len], 0 where a key is
    visible and <= the float32 minimum where it is masked; `causal=True` says it includes the causal
    mask. With `decode=True` keys and values are written into the `cache` collection at
    `cache_index` and the queries attend over the whole cache (the caller's `bias` covers the cache
    length).

    `impl` (config.ATTENTION_IMPLS): "einsum" computes the scores itself, as HF does, from `bias`;
    the others take the causal flag and `segment_ids` [B, len] or `lengths` [B] instead of a bias
    (`masked_attention`; not when decoding): "xla" and "cudnn" through
    `jax.nn.dot_product_attention` ("cudnn" is the fused flash-attention kernel that skips the
    causal upper triangle), "splash" through Pallas's TPU kernel. The query rows that see no key
    at all (padding) then come out differently from HF's; the others agree.
    """

    num_heads: int
    inner_layer_norm_eps: float | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "einsum"

    @nn.compact
    def __call__(self, x, kv=None, bias=None, deterministic: bool = True, decode: bool = False,
                 causal: bool = False, segment_ids=None, lengths=None):
        kv = x if kv is None else kv
        width = x.shape[-1]
        head_dim = width // self.num_heads
        dense = lambda name, axes=("embed", "heads"): Dense(width, axes, dtype=self.dtype,
                                                            param_dtype=self.param_dtype, name=name)
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, head_dim)
        q = split(checkpoint_name(dense("q_proj")(x), "query_proj") * head_dim ** -0.5)
        k = split(checkpoint_name(dense("k_proj")(kv), "key_proj"))
        v = split(checkpoint_name(dense("v_proj")(kv), "value_proj"))
        q = constrain(q, ("act_batch", "act_len", "act_heads", None))
        kv_layout = "bkhd"
        if decode:
            k, v, kv_layout = self._update_cache(k, v)
        if self.impl == "einsum" or decode:
            out = self._einsum_attention(q, k, v, bias, deterministic, kv_layout)
        else:
            if self.dropout > 0.0 and not deterministic:
                raise UsageError(f"attention_impl={self.impl!r} has no attention dropout "
                                 f"(jax.nn.dot_product_attention); set the towers' attention_dropout to 0.0 "
                                 f"or use attention_impl='einsum'")
            out = masked_attention(q, k.astype(q.dtype), v.astype(q.dtype), causal, segment_ids, lengths, self.impl)
        out = checkpoint_name(out.reshape(*x.shape[:2], width), "context")
        out = constrain(out, ("act_batch", "act_len", "act_heads"))
        if self.inner_layer_norm_eps is not None:
            out = layer_norm(self.inner_layer_norm_eps, "heads", self.dtype, self.param_dtype, name="inner_attn_ln")(out)
        out = Dense(width, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(out)
        return checkpoint_name(out, "out_proj")

    def _einsum_attention(self, q, k, v, bias, deterministic, kv_layout: str = "bkhd"):
        """`kv_layout`: the axes of `k` and `v`, "bkhd" as projected or "bhkd" as the cache keeps them."""
        logits = jnp.einsum(f"bqhd,{kv_layout}->bhqk", q, k, preferred_element_type=jnp.float32).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1)
        if self.dropout > 0.0 and not deterministic:
            weights = nn.Dropout(self.dropout)(weights, deterministic=False)
        return jnp.einsum(f"bhqk,{kv_layout}->bqhd", weights.astype(self.dtype), v)

    def _update_cache(self, k, v):
        """Write this step's keys/values at `cache_index` -> (keys, values, their layout); the cache
        is created by `init` with the full decoding length (the length of the input used to
        initialize it). It keeps the heads before the positions, [B, heads, len, head_dim], the
        layout both attention products take as they are: in the projections' [B, len, heads,
        head_dim] XLA copied every layer's whole cache into the other layout at every decoding step
        (MaxText orders its decoding cache for the same reason, `ar_cache_axis_order`)."""
        is_init = not self.has_variable("cache", "cached_key")
        heads_major = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
        cached_k = self.variable("cache", "cached_key", jnp.zeros, heads_major(k).shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, heads_major(v).shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if is_init:
            return k, v, "bkhd"
        start = (0, 0, index.value, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, heads_major(k).astype(cached_k.value.dtype), start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, heads_major(v).astype(cached_v.value.dtype), start)
        index.value = index.value + k.shape[1]
        return cached_k.value, cached_v.value, "bhkd"


# Activations tagged with `checkpoint_name` in every block (attention: q/k/v projections, the
# merged heads before `out_proj` ("context"), `out_proj`; MLP: the outputs of fc1 and fc2).
CHECKPOINT_NAMES = ("query_proj", "key_proj", "value_proj", "context", "out_proj", "mlp_in", "mlp_out")
# MaxText's presets over those names: `minimal` keeps every projection, `minimal_with_context` also
# the attention's output, so the backward recomputes only the elementwise ops (and attention).
NAMED_POLICIES = {"minimal": ("query_proj", "key_proj", "value_proj", "out_proj", "mlp_in", "mlp_out"),
                  "minimal_with_context": ("query_proj", "key_proj", "value_proj", "context", "out_proj",
                                           "mlp_in", "mlp_out")}
# `jax.checkpoint_policies` members that are policies themselves (the others build one from names)
_JAX_POLICIES = ("checkpoint_dots", "checkpoint_dots_with_no_batch_dims", "dots_saveable",
                 "dots_with_no_batch_dims_saveable", "everything_saveable", "nothing_saveable")
_ALIASES = {"full": "nothing_saveable", "dots": "checkpoint_dots",
            "dots_with_no_batch_dims": "checkpoint_dots_with_no_batch_dims"}


def remat_policy(name: str):
    """A `model.remat_policy` name -> the `jax.checkpoint` policy (what the backward keeps; the
    rest is recomputed). "none" means no remat at all and has no policy. Names: "full" (keep
    nothing), "dots", "dots_with_no_batch_dims", any plain `jax.checkpoint_policies` policy,
    "minimal", "minimal_with_context", or "save:NAME+NAME..." over `CHECKPOINT_NAMES`."""
    name = _ALIASES.get(name, name)
    if name in _JAX_POLICIES:
        return getattr(jax.checkpoint_policies, name)
    if name in NAMED_POLICIES or name.startswith("save:"):
        names = NAMED_POLICIES.get(name) or tuple(n for n in name[len("save:"):].split("+") if n)
        bad = [n for n in names if n not in CHECKPOINT_NAMES]
        if bad or not names:
            raise UsageError(f"remat_policy {name!r}: names must be some of {', '.join(CHECKPOINT_NAMES)}")
        return jax.checkpoint_policies.save_only_these_names(*names)
    raise UsageError(f"remat_policy {name!r} not in none, {', '.join(_ALIASES)}, {', '.join(_JAX_POLICIES)}, "
                     f"{', '.join(NAMED_POLICIES)} or save:NAME+NAME (names: {', '.join(CHECKPOINT_NAMES)})")


def stack_layers(block_cls: type[nn.Module], num_layers: int, remat: str, scan: bool, name: str,
                 frozen: int = 0, owner: nn.Module | None = None, **block_kwargs):
    """`num_layers` copies of `block_cls`: `nn.scan`ned (params and cache stacked on a leading
    `layers` axis) or a Python loop, with an optional `nn.remat` policy. Call the result as
    `(x, args)` with `args` a tuple of arrays shared by every layer; blocks take `(x, *args)`.

    `frozen` > 0 with `scan` (and the calling module as `owner`): the first `frozen` layers, and
    everything before them, get no gradient, and the backward stops at them. The same stacked
    parameters, but applied as two scans, the first under `stop_gradient`: one scan over all
    layers would carry the backward through every layer even where it only multiplies by zero. (A
    loop of layers needs none of this: `stop_gradient` on the frozen parameters is enough.)"""
    block = block_cls
    if remat != "none":
        block = nn.remat(block, policy=remat_policy(remat), prevent_cse=not scan)
    if scan:
        def scanned(length, **kwargs):
            return nn.scan(_ScanAdapter, variable_axes={"params": 0, "cache": 0},
                           split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast, length=length,
                           metadata_params={nn.PARTITION_NAME: "layers"})(
                block=block, block_kwargs=tuple(block_kwargs.items()), **kwargs)

        if frozen and owner is not None and name in owner.variables.get("params", {}):
            return partial(_frozen_then_trained, scanned, owner.variables["params"][name], frozen, num_layers,
                           {"dropout": owner.make_rng("dropout")} if owner.has_rng("dropout") else {})
        return scanned(num_layers, name=name)
    return _Loop(block=block, num_layers=num_layers, block_kwargs=tuple(block_kwargs.items()), name=name)


def _frozen_then_trained(scanned, params, frozen: int, num_layers: int, rngs: dict, x, args):
    """`stack_layers`'s scan as a frozen scan over the first `frozen` layers, then the rest."""
    head = jax.tree_util.tree_map(lambda p: jax.lax.stop_gradient(p[:frozen]), params)
    x, _ = scanned(frozen, parent=None).apply({"params": head}, jax.lax.stop_gradient(x), args, rngs=rngs)
    if frozen < num_layers:
        tail = jax.tree_util.tree_map(lambda p: p[frozen:], params)
        x, _ = scanned(num_layers - frozen, parent=None).apply({"params": tail}, x, args, rngs=rngs)
    return x, None


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
