"""The compiled-program reader behind ``launch/aot_check.py`` against counts done by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from cavmae_jax import hlo_stats


def test_matmuls_inside_nested_loops_are_weighed_by_their_trip_counts():
    """Two nested scans (like gradient accumulation around a layer stack): XLA's own cost
    analysis counts each loop body once; the reader counts every execution."""
    rows, width, layers, micro = 32, 64, 7, 3

    def layer_stack(x, ws):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

    def accumulate(xs, ws):
        return jax.lax.scan(lambda total, x: (total + layer_stack(x, ws).sum(), None), 0.0, xs)[0]

    xs = jnp.ones((micro, rows, width))
    ws = jnp.ones((layers, width, width))
    compiled = jax.jit(accumulate).lower(xs, ws).compile()
    by_hand = micro * layers * 2 * rows * width * width
    stats = hlo_stats.analyze(compiled.as_text())
    assert stats.matmul_flops == by_hand and stats.unknown_trip_counts == 0
    assert compiled.cost_analysis()["flops"] < by_hand / 10  # why the reader exists
    # each step reads the layer's weights and the carry and writes the carry, at least
    assert stats.bytes_accessed >= micro * layers * 4 * (width * width + 2 * rows * width)


MODULE = """HloModule m, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[16,256])) -> pred[] {
  %p = (s32[], f32[16,256]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[16,256])) -> (s32[], f32[16,256]) {
  %p = (s32[], f32[16,256]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[16,256]{1,0} get-tuple-element(%p), index=1
  %w = bf16[4,256]{1,0} constant({...})
  %g = bf16[16,256]{1,0} all-gather(%w), dimensions={0}, replica_groups={{0,1,2,3}}
  %r = f32[16,256]{1,0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%add
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[16,256]) tuple(%j, %r)
}

ENTRY %main (x: f32[16,256]) -> f32[4,256] {
  %x = f32[16,256]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[16,256]) tuple(%zero, %x)
  %loop = (s32[], f32[16,256]) while(%init), condition=%cond, body=%body
  %y = f32[16,256]{1,0} get-tuple-element(%loop), index=1
  ROOT %rs = f32[4,256]{1,0} reduce-scatter(%y), dimensions={0}, to_apply=%add
}
"""


def test_collectives_are_counted_per_execution_with_the_full_tensor_size():
    stats = hlo_stats.analyze(MODULE)
    assert stats.collectives == {
        "all-gather": {"count": 12, "bytes": 12 * 16 * 256 * 2},  # gathered bf16 result
        "all-reduce": {"count": 12, "bytes": 12 * 16 * 256 * 4},
        "reduce-scatter": {"count": 1, "bytes": 16 * 256 * 4},  # the tensor before scattering
    }


def test_a_module_without_entry_is_refused():
    with pytest.raises(ValueError, match="no ENTRY"):
        hlo_stats.analyze("HloModule m\n")


TRAFFIC = """HloModule t, is_scheduled=true

%fused_slice (p0: f32[64,256], p1: s32[]) -> f32[4,256] {
  %p0 = f32[64,256]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[4,256]{1,0} dynamic-slice(%p0, %p1, %z), dynamic_slice_sizes={4,256}
}

%fused_update (q0: f32[64,256], q1: f32[4,256], q2: s32[]) -> f32[64,256] {
  %q0 = f32[64,256]{1,0} parameter(0)
  %q1 = f32[4,256]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %e = f32[4,256]{1,0} exponential(%q1)
  ROOT %dus = f32[64,256]{1,0} dynamic-update-slice(%q0, %e, %q2, %z)
}

ENTRY %main (x: f32[64,256], i: s32[]) -> f32[64,256] {
  %x = f32[64,256]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %s = f32[4,256]{1,0} fusion(%x, %i), kind=kLoop, calls=%fused_slice, @SLICED
  %buffer = f32[64,256]{1,0} custom-call(), custom_call_target="AllocateBuffer"
  %cs = (f32[4,256]{1,0}, f32[4,256]{1,0}, u32[]) copy-start(%s)
  %cd = f32[4,256]{1,0} copy-done(%cs)
  %joined = f32[8,256]{1,0} custom-call(%cd, %cd), custom_call_target="ConcatBitcast"
  ROOT %u = f32[64,256]{1,0} fusion(%x, %cd, %i), kind=kLoop, calls=%fused_update, @UPDATED
}
"""
TRAFFIC = TRAFFIC.replace(
    "@SLICED", 'metadata={op_name="jit(update)/encoder_a/attention/dynamic_slice"}'
).replace("@UPDATED", 'metadata={op_name="jit(update)/transpose(jvp(decoder))/mlp/dus"}')


def test_the_traffic_model_counts_slices_in_place_updates_and_copies_as_documented():
    """By hand: a fusion reading a slice of a parameter moves the slice (and its index), an
    in-place update of a slice reads its input and writes the slice (not the buffer), a buffer
    reservation and a bitcast concatenation move nothing, an asynchronous copy is summed apart
    (source, destination and both tuples, as XLA counts it), and each byte is charged to the
    named scope of the instruction that moves it."""
    stats = hlo_stats.analyze(TRAFFIC)
    tile = 4 * 256 * 4  # bytes of one f32[4,256]
    sliced = tile + 4 + tile  # read the slice and the index, write the result
    updated = tile + 4 + 2 * tile  # read the update's input and the index; the slice in place
    assert stats.bytes_accessed == sliced + updated
    assert stats.async_copy_bytes == 2 * (tile + 2 * tile + 4)
    assert stats.by_source["encoder_a/attention"]["bytes"] == sliced
    assert stats.by_source["decoder/mlp"]["bytes"] == updated


TILED = """HloModule t, is_scheduled=true

ENTRY %main (q: bf16[4,512,64], w: f32[3]) -> bf16[4,512,64] {
  %q = bf16[4,512,64]{2,1,0:T(8,128)(2,1)} parameter(0)
  %w = f32[3]{0:T(256)} parameter(1)
  %x = bf16[4,512,64]{2,1,0:T(8,128)(2,1)S(1)} negate(%q)
  %cs = (bf16[4,512,64]{2,1,0:T(8,128)}, bf16[4,512,64]{2,1,0:T(8,128)S(1)}, u32[]) copy-start(%x)
  %cd = bf16[4,512,64]{2,1,0:T(8,128)(2,1)} copy-done(%cs)
  %t = bf16[4,64,512]{2,1,0:T(8,128)(2,1)} transpose(%cd), dimensions={0,2,1}
  ROOT %r = bf16[4,512,64]{1,2,0:T(8,128)(2,1)} copy(%t)
}
"""


def test_arrays_count_at_their_tiled_size_and_hbm_traffic_leaves_on_chip_buffers_out():
    """By hand: a bf16 [4, 512, 64] array stored with 64 minor takes 128 lanes (twice its
    size), stored with 512 minor it takes its size; a 3-element f32 vector takes a 256-element
    tile. The negation reads from HBM and writes on chip; the copy back to HBM reads on chip
    and writes HBM; the transpose and the relayout stay in HBM."""
    logical = 4 * 512 * 64 * 2
    padded = 2 * logical
    assert hlo_stats.footprint("bf16[4,512,64]{2,1,0:T(8,128)(2,1)}") == padded
    assert hlo_stats.footprint("bf16[4,512,64]{1,2,0:T(8,128)(2,1)}") == logical
    assert hlo_stats.footprint("f32[3]{0:T(256)}") == 256 * 4
    assert hlo_stats.footprint("bf16[4,512,64]{2,1,0:T(8,128)(2,1)S(1)}", hbm_only=True) == 0
    assert hlo_stats.nbytes("bf16[4,512,64]{2,1,0:T(8,128)(2,1)}") == logical
    stats = hlo_stats.analyze(TILED)
    negate, transpose, relayout = 2 * padded, padded + logical, logical + logical
    assert stats.bytes_accessed == negate + transpose + relayout
    # HBM only: the negation's read, the copy's write, the transpose and the relayout
    assert stats.hbm_bytes == padded + padded + transpose + relayout


KERNEL = """HloModule k, is_scheduled=true

ENTRY %main (x: bf16[6,512,2304], b: bf16[1,2304]) -> bf16[6,512,768] {
  %x = bf16[6,512,2304]{2,1,0} parameter(0)
  %b = bf16[1,2304]{1,0} parameter(1)
  ROOT %k = bf16[6,512,768]{2,1,0} custom-call(%x, %x, %x, %b, %b, %b), @STATED
  %other = bf16[6,512,768]{2,1,0} custom-call(%x), custom_call_target="tpu_custom_call"
}
"""

KERNEL = KERNEL.replace(
    "@STATED",
    'custom_call_target="tpu_custom_call", backend_config={"custom_call_config": '
    '{"cost_estimate":{"flops":"100","transcendentals":"1","bytes_accessed":"18874368",'
    '"remote_bytes_transferred":"0"}}}',
)


def test_a_kernel_that_states_its_bytes_counts_them():
    """A Pallas kernel that takes one buffer three times and reads a third of it each time (the
    grouped attention) counts the bytes its cost estimate states, as XLA does; a kernel that
    states none counts its operands and outputs."""
    stats = hlo_stats.analyze(KERNEL)
    projection, output = 6 * 512 * 2304 * 2, 6 * 512 * 768 * 2
    assert stats.bytes_accessed == 18874368 + projection + output
    assert stats.matmul_flops == 100
