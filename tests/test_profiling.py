"""kosmos2_jax/train/profiling.py: reading optimized HLO and attributing op time."""

import jax
import jax.numpy as jnp

from kosmos2_jax.train import profiling

HLO = """HloModule jit_step_fn, entry_computation_layout={(f32[4,8]{1,0})->(f32[4,8]{1,0}, s32[])}

%fused_dot (param_0: f32[4,8], param_1: f32[8,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,8]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step_fn)/jvp(Kosmos2)/text_model/layers/ffn/fc1/dot_general"}
}

%wrapped_convert_computation (param_0.2: bf16[4,8]) -> f32[4,8] {
  %param_0.2 = bf16[4,8]{1,0} parameter(0)
  ROOT %convert.3 = f32[4,8]{1,0} convert(%param_0.2), metadata={op_name="jit(step_fn)/jvp(Kosmos2)/Kosmos2.image_features/vision_model/convert_element_type"}
}

ENTRY %main.9 (p0: f32[4,8], p1: f32[8,8]) -> (f32[4,8], s32[]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  %fusion.7 = f32[4,8]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step_fn)/jvp(Kosmos2)/text_model/layers/ffn/fc1/dot_general"}
  %wrapped_convert.2 = f32[4,8]{1,0} fusion(%p0), kind=kLoop, calls=%wrapped_convert_computation
  %custom-call.4 = (bf16[4,8]{1,0}, u8[0]{0}) custom-call(%p0, %p0, %p0), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step_fn)/jvp(Kosmos2)/text_model/layers/self_attn/dot_product_attention"}
  %all-reduce.5 = f32[8,8]{1,0} all-reduce(%p1), replica_groups={}, to_apply=%add, metadata={op_name="jit(step_fn)/optimizer/add"}
  %multiply.6 = f32[4,8]{1,0} multiply(%p0, %p0), metadata={op_name="jit(step_fn)/jvp(lm_head)/mul"}
  ROOT %tuple.8 = (f32[4,8]{1,0}, s32[]) tuple(%fusion.7, %p0)
}
"""


def test_parse_hlo_opcodes_names_and_called_computations():
    ops = profiling.parse_hlo(HLO)
    assert ops["fusion.7"][0] == "fusion" and "dot" in ops["fusion.7"][3]
    assert ops["tuple.8"][0] == "tuple"  # a tuple-typed instruction: the opcode after the type
    assert ops["custom-call.4"][0] == "custom-call" and ops["custom-call.4"][2] == "__cudnn$fmhaSoftmax"
    # no metadata of its own: the op_name of what it wraps
    assert "vision_model" in ops["wrapped_convert.2"][1]


def test_parts_and_kinds():
    ops = profiling.parse_hlo(HLO)
    attribution = {name: (profiling.part_of(op[1]), profiling.kind_of(*op)) for name, op in ops.items()}
    assert attribution["fusion.7"] == ("decoder", "matmul")
    assert attribution["wrapped_convert.2"] == ("vision tower", "other")
    assert attribution["custom-call.4"] == ("decoder", "attention")
    assert attribution["all-reduce.5"] == ("optimizer", "collective")
    assert attribution["multiply.6"] == ("LM head + loss", "other")
    assert profiling.part_of("encoder/encoder/checkpoint/layer/fc1/dot_general") == "vision tower"
    assert profiling.part_of("layers/layers/checkpoint/layer/fc1/dot_general") == "decoder"
    assert profiling.part_of("jit(step_fn)/jvp(Kosmos2)/text_model/embed_tokens/gather") == "decoder"


def test_trace_and_summarize_a_program(tmp_path):
    def step(x, w):
        with jax.named_scope("text_model"):
            h = jnp.tanh(x @ w)
        with jax.named_scope("optimizer"):
            return h * 0.5 + 1.0

    x = jnp.ones((256, 256))
    compiled = jax.jit(step).lower(x, x).compile()
    out = profiling.trace(lambda: compiled(x, x), 2, str(tmp_path))
    assert out.shape == (256, 256)
    summary = profiling.summarize(str(tmp_path), compiled.as_text(), 2)
    assert summary["table"].get(("decoder", "matmul"), 0.0) > 0, summary
    assert summary["top"] and summary["top"][0][1] > 0
    text = profiling.format_summary(summary, 0.01)
    assert "| decoder |" in text and "| all |" in text
