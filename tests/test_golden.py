"""Exact golden of the rewritten Dynamo graph for the project's toy decoder.

Regenerate after an intended change with `EXPECTTEST_ACCEPT=1 pytest tests/test_golden.py`, and read
the diff: it is the change lemo makes to users' graphs.
"""

from __future__ import annotations

import re
import unittest
import warnings

import expecttest
import torch
import torch._dynamo

import lemo_compile
from toy import ToyDecoder


def readable(code: str) -> str:
    """Graph code without the signature, parameter aliases and `x = None` frees; short names."""
    lines = []
    for line in code.strip().splitlines()[1:]:
        if re.match(r"\s+l_\w+ = L_\w+$", line):
            continue
        line = re.sub(r";  .* = None$", "", line)
        line = re.sub(r"l_self_modules_(\w+?)_parameters_weight_", lambda m: m.group(1) + "_w", line)
        lines.append(line.replace("_modules_", "_").strip())
    return "\n".join(lines)


class GoldenGraph(expecttest.TestCase):
    def test_toy_decoder_rewritten_graph(self):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = ToyDecoder(layers=2).train()
        backend = lemo_compile.LemoBackend(
            {"compiler": "aot_eager", "block_size": 16, "keep_ratio": 0.5, "dense_layers": [0],
             "loss_segment": 32}
        )
        ids = torch.randint(0, 32, (1, 72))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lemo_compile.LemoWarning)
            _, loss = torch.compile(model, backend=backend, fullgraph=True)(ids, ids)
        loss.backward()
        self.assertExpectedInline(readable(backend.reports[-1].graphs["loss"]), """\
arange = torch.arange(0, 8, 2, device = device(type='cpu'))
truediv = arange / 8
pow_1 = 10000 ** truediv
freqs = 1.0 / pow_1
arange_1 = torch.arange(72, device = device(type='cpu'), dtype = torch.float32)
angles = torch.outer(arange_1, freqs)
cat = torch.cat([angles, angles], dim = -1)
angles_1 = cat[None]
cos = angles_1.cos()
sin = angles_1.sin()
x = torch.nn.functional.embedding(l_ids_, embed_w, None, None, 2.0, False, False)
pow_2 = x.pow(2)
mean = pow_2.mean(-1, keepdim = True)
add = mean + 1e-06
rsqrt = torch.rsqrt(add)
mul = x * rsqrt
mul_1 = mul * layers_0_norm1_w
linear = torch._C._nn.linear(mul_1, layers_0_attn_q_w, None)
view = linear.view(1, 72, 4, 8)
q = view.transpose(1, 2)
linear_1 = torch._C._nn.linear(mul_1, layers_0_attn_k_w, None)
view_1 = linear_1.view(1, 72, 2, 8)
k = view_1.transpose(1, 2)
linear_2 = torch._C._nn.linear(mul_1, layers_0_attn_v_w, None)
view_2 = linear_2.view(1, 72, 2, 8)
v = view_2.transpose(1, 2)
getitem_1 = q[(Ellipsis, slice(4, None, None))]
neg = -getitem_1
getitem_2 = q[(Ellipsis, slice(None, 4, None))]
rotated = torch.cat([neg, getitem_2], dim = -1)
mul_2 = q * cos
mul_3 = rotated * sin
q_1 = mul_2 + mul_3
getitem_3 = k[(Ellipsis, slice(4, None, None))]
neg_1 = -getitem_3
getitem_4 = k[(Ellipsis, slice(None, 4, None))]
rotated_1 = torch.cat([neg_1, getitem_4], dim = -1)
mul_4 = k * cos
mul_5 = rotated_1 * sin
k_1 = mul_4 + mul_5
out = torch._C._nn.scaled_dot_product_attention(q_1, k_1, v, is_causal = True, enable_gqa = True)
transpose_3 = out.transpose(1, 2)
reshape = transpose_3.reshape(1, 72, -1)
linear_3 = torch._C._nn.linear(reshape, layers_0_attn_o_w, None)
x_1 = x + linear_3
pow_3 = x_1.pow(2)
mean_1 = pow_3.mean(-1, keepdim = True)
add_4 = mean_1 + 1e-06
rsqrt_1 = torch.rsqrt(add_4)
mul_6 = x_1 * rsqrt_1
mul_7 = mul_6 * layers_0_norm2_w
linear_4 = torch._C._nn.linear(mul_7, layers_0_mlp_gate_w, None)
silu = torch.nn.functional.silu(linear_4)
linear_5 = torch._C._nn.linear(mul_7, layers_0_mlp_up_w, None)
mul_8 = silu * linear_5
linear_6 = torch._C._nn.linear(mul_8, layers_0_mlp_down_w, None)
x_2 = x_1 + linear_6
detach = torch_Tensor_detach(x_2)
pow_7 = detach.pow(2)
mean_5 = pow_7.mean(-1, keepdim = True)
add_13 = mean_5 + 1e-06
rsqrt_5 = torch.rsqrt(add_13)
mul_20 = detach * rsqrt_5
mul_21 = mul_20 * layers_1_norm1_w
linear_15 = torch._C._nn.linear(mul_21, layers_1_attn_q_w, None)
view_8 = linear_15.view(1, 72, 4, 8)
q_4 = view_8.transpose(1, 2)
linear_16 = torch._C._nn.linear(mul_21, layers_1_attn_k_w, None)
view_9 = linear_16.view(1, 72, 2, 8)
k_4 = view_9.transpose(1, 2)
getitem_9 = q_4[(Ellipsis, slice(4, None, None))]
neg_4 = -getitem_9
getitem_10 = q_4[(Ellipsis, slice(None, 4, None))]
rotated_4 = torch.cat([neg_4, getitem_10], dim = -1)
mul_22 = q_4 * cos
mul_23 = rotated_4 * sin
q_5 = mul_22 + mul_23
getitem_11 = k_4[(Ellipsis, slice(4, None, None))]
neg_5 = -getitem_11
getitem_12 = k_4[(Ellipsis, slice(None, 4, None))]
rotated_5 = torch.cat([neg_5, getitem_12], dim = -1)
mul_24 = k_4 * cos
mul_25 = rotated_5 * sin
k_5 = mul_24 + mul_25
detach_1 = torch_Tensor_detach(q_5)
detach_2 = torch_Tensor_detach(k_5)
block_scores_default = torch.ops.lemo.block_scores.default(detach_1, detach_2, 16)
select_tokens = lemo_compile_ops_select_tokens(block_scores_default, 2, 16, 72)
gather_tokens = lemo_compile_ops_gather_tokens(x_2, select_tokens, (1,))
gather_tokens_1 = lemo_compile_ops_gather_tokens(cos, select_tokens, (1,))
gather_tokens_2 = lemo_compile_ops_gather_tokens(sin, select_tokens, (1,))
pow_4 = gather_tokens.pow(2)
mean_2 = pow_4.mean(-1, keepdim = True)
add_6 = mean_2 + 1e-06
rsqrt_2 = torch.rsqrt(add_6)
mul_9 = gather_tokens * rsqrt_2
mul_10 = mul_9 * layers_1_norm1_w
linear_7 = torch._C._nn.linear(mul_10, layers_1_attn_q_w, None)
view_3 = linear_7.view((1, 40, 4, 8))
q_2 = view_3.transpose(1, 2)
linear_8 = torch._C._nn.linear(mul_10, layers_1_attn_k_w, None)
view_4 = linear_8.view((1, 40, 2, 8))
k_2 = view_4.transpose(1, 2)
linear_9 = torch._C._nn.linear(mul_10, layers_1_attn_v_w, None)
view_5 = linear_9.view((1, 40, 2, 8))
v_1 = view_5.transpose(1, 2)
getitem_5 = q_2[(Ellipsis, slice(4, None, None))]
neg_2 = -getitem_5
getitem_6 = q_2[(Ellipsis, slice(None, 4, None))]
rotated_2 = torch.cat([neg_2, getitem_6], dim = -1)
mul_11 = q_2 * gather_tokens_1
mul_12 = rotated_2 * gather_tokens_2
q_3 = mul_11 + mul_12
getitem_7 = k_2[(Ellipsis, slice(4, None, None))]
neg_3 = -getitem_7
getitem_8 = k_2[(Ellipsis, slice(None, 4, None))]
rotated_3 = torch.cat([neg_3, getitem_8], dim = -1)
mul_13 = k_2 * gather_tokens_1
mul_14 = rotated_3 * gather_tokens_2
k_3 = mul_13 + mul_14
out_1 = torch._C._nn.scaled_dot_product_attention(q_3, k_3, v_1, is_causal = True, enable_gqa = True)
transpose_7 = out_1.transpose(1, 2)
reshape_1 = transpose_7.reshape((1, 40, 32))
linear_10 = torch._C._nn.linear(reshape_1, layers_1_attn_o_w, None)
scatter_add_tokens = lemo_compile_ops_scatter_add_tokens(x_2, select_tokens, linear_10)
pow_5 = scatter_add_tokens.pow(2)
mean_3 = pow_5.mean(-1, keepdim = True)
add_10 = mean_3 + 1e-06
rsqrt_3 = torch.rsqrt(add_10)
mul_15 = scatter_add_tokens * rsqrt_3
mul_16 = mul_15 * layers_1_norm2_w
linear_11 = torch._C._nn.linear(mul_16, layers_1_mlp_gate_w, None)
silu_1 = torch.nn.functional.silu(linear_11)
linear_12 = torch._C._nn.linear(mul_16, layers_1_mlp_up_w, None)
mul_17 = silu_1 * linear_12
linear_13 = torch._C._nn.linear(mul_17, layers_1_mlp_down_w, None)
x_4 = scatter_add_tokens + linear_13
pow_6 = x_4.pow(2)
mean_4 = pow_6.mean(-1, keepdim = True)
add_12 = mean_4 + 1e-06
rsqrt_4 = torch.rsqrt(add_12)
mul_18 = x_4 * rsqrt_4
mul_19 = mul_18 * norm_w
view_7 = l_ids_.view(-1)
reshape_2 = mul_19.reshape(-1, 32)
linear_cross_entropy = lemo_compile_ops_linear_cross_entropy(reshape_2, head_w, None, view_7, -100, 'mean', 32, torch.float32)
nan_placeholder = lemo_compile_ops_nan_placeholder([1, 72, 32], torch.float32, device(type='cpu'))
return (nan_placeholder, linear_cross_entropy)""")


if __name__ == "__main__":
    unittest.main()
