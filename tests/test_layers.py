"""Layers against PyTorch/NumPy definitions: patch order, LayerNorm, GELU, attention layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cavmae_jax.models import layers
from cavmae_jax.models.config import ModelConfig
from cavmae_jax.models.encoder import AudioVisualEncoder


def test_audio_tokens_are_frequency_major_with_time_columns():
    """Token 1 starts at frame 16 and token 64 at mel bin 16 (official behaviour 3)."""
    cfg = ModelConfig()
    fbank = np.zeros((1, 1024, 128), np.float32)
    fbank[0, 16, 0] = 1.0  # frame 16, mel bin 0
    fbank[0, 0, 16] = 2.0  # frame 0, mel bin 16
    fbank[0, 3, 5] = 3.0  # inside token 0: freq offset 5, time offset 3
    encoder = nnx.eval_shape(lambda: AudioVisualEncoder(cfg, nnx.Rngs(0)))
    patches = np.asarray(encoder.audio_patches(jnp.asarray(fbank)))
    assert patches.shape == (1, 512, 256)
    assert patches[0, 1, 0] == 1.0
    assert patches[0, 64, 0] == 2.0
    assert patches[0, 0, 5 * 16 + 3] == 3.0
    assert np.count_nonzero(patches) == 3


def test_patchify_channel_is_fastest_and_unpatchify_inverts():
    images = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    patches = np.asarray(layers.patchify(jnp.asarray(images), 4))
    assert patches.shape == (2, 6, 48)
    row, col, p, q, c = 1, 2, 3, 1, 2  # token row*3 + col, vector (p*4 + q)*3 + c
    assert patches[0, row * 3 + col, (p * 4 + q) * 3 + c] == images[0, row * 4 + p, col * 4 + q, c]
    back = layers.unpatchify(jnp.asarray(patches), (2, 3), 4, 3)
    np.testing.assert_array_equal(np.asarray(back), images)


def test_layer_norm_is_pytorch_exact_on_large_offsets():
    """eps 1e-5 with two-pass variance; a one-pass E[x^2]-E[x]^2 fails on this input."""
    x = (1000.0 + np.random.default_rng(0).standard_normal((4, 64))).astype(np.float32)
    norm = layers.layer_norm(64, nnx.Rngs(0))
    mean = x.astype(np.float64).mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, atol=2e-4)
    assert norm.epsilon == 1e-5


def test_mlp_uses_exact_erf_gelu():
    mlp = layers.Mlp(4, 8, nnx.Rngs(0))
    mlp.fc1.kernel[...] = jnp.eye(4, 8)
    mlp.fc1.bias[...] = jnp.zeros(8)
    mlp.fc2.kernel[...] = jnp.eye(8, 4)
    mlp.fc2.bias[...] = jnp.zeros(4)
    x = np.array([[-3.0, -1.0, 0.5, 2.0]], np.float32)
    from math import erf, sqrt

    expected = [[0.5 * v * (1 + erf(v / sqrt(2))) for v in x[0]]]
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), expected, rtol=1e-5)  # tanh: 10%


def test_attention_splits_fused_qkv_as_which_head_dim():
    """Output column s*C + h*(C/H) + d of qkv is (q|k|v)[s], head h, dim d (behaviour 5)."""
    dim, heads, n = 8, 2, 5
    attn = layers.Attention(dim, heads, nnx.Rngs(1))
    x = np.random.default_rng(1).standard_normal((1, n, dim)).astype(np.float32)
    w = np.asarray(attn.qkv.kernel[...])
    b = np.asarray(attn.qkv.bias[...])
    qkv = x[0] @ w + b
    hd = dim // heads
    outs = []
    for h in range(heads):
        q, k, v = (qkv[:, s * dim + h * hd : s * dim + (h + 1) * hd] for s in range(3))
        scores = (q @ k.T) * hd**-0.5
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        outs.append(probs @ v)
    expected = np.concatenate(outs, -1) @ np.asarray(attn.proj.kernel[...]) + np.asarray(
        attn.proj.bias[...]
    )
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x)))[0], expected, rtol=1e-5, atol=1e-6)


def test_block_selects_norm_pair_by_modality():
    block = layers.Block(8, 2, 4.0, nnx.Rngs(0))
    block.norm1_a.scale[...] = jnp.full(8, 3.0)
    x = jax.random.normal(jax.random.key(0), (1, 3, 8))
    joint, audio, visual = block(x), block(x, "a"), block(x, "v")
    np.testing.assert_array_equal(np.asarray(joint), np.asarray(visual))
    assert not np.allclose(np.asarray(joint), np.asarray(audio))


def test_parameters_carry_logical_axis_names():
    block = layers.Block(8, 2, 4.0, nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(block))
    assert tuple(specs["mlp"]["fc1"]["kernel"].get_value()) == ("embed", "mlp")
    assert tuple(specs["attn"]["qkv"]["kernel"].get_value()) == ("embed", "qkv")
    assert tuple(specs["norm1"]["scale"].get_value()) == ("embed",)


def test_block_stack_equals_blocks_applied_in_order():
    stack = layers.BlockStack(3, 8, 2, 4.0, nnx.Rngs(0))
    graphdef, state = nnx.split(stack.layers)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    expected = x
    for i in range(3):
        block = nnx.merge(graphdef, jax.tree.map(lambda p, i=i: p[i], state))
        expected = block(expected, "a")
    np.testing.assert_allclose(
        np.asarray(stack(x, "a")), np.asarray(expected), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(stack(x, "a", last_only=True)), np.asarray(block(x, "a")), rtol=1e-5, atol=1e-6
    )
    specs = nnx.get_partition_spec(nnx.state(stack))
    assert tuple(specs["layers"]["mlp"]["fc1"]["kernel"].get_value()) == ("layers", "embed", "mlp")
    assert len(layers.BlockStack(0, 8, 2, 4.0, nnx.Rngs(0))) == 0
