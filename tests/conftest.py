"""Shared fixtures: tiny Hugging Face Llama models and a fresh Dynamo state for every test."""

from __future__ import annotations

import os
import shutil

# Without a GPU, lemo's Triton kernels run in Triton's interpreter on CPU tensors (kernel tests call
# them eagerly). Triton reads this when it is first imported, which importing torch can do: so it
# is decided here, before torch, from the NVIDIA driver's presence.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402

# pytest-xdist runs one worker per core (the README's `-n 2`): with torch's default of one
# intra-op thread per core each, the workers oversubscribe the cores (on 2 cores, one thread each
# ran test_padding.py and test_lifetimes.py in 169 s instead of 220 s). Inductor's pool of
# compile processes (one per core) does the same: compiling in the worker itself ran
# test_inductor.py and test_predictors.py in 218 s instead of 239 s.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch._inductor.config  # noqa: E402

    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no graphs cached by an earlier test)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_llama(*, kv_heads: int = 2, layers: int = 4, seed: int = 0, dtype=torch.float32,
               intermediate: int = 96):
    """A 4-layer Llama (hidden 64, 4 heads, head dim 16, MLP width `intermediate`) in training
    mode, without KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).train()


def tiny_opt(*, layers: int = 4, pre_norm: bool = True, dropout: float = 0.0,
             dtype=torch.float32):
    """A 4-layer OPT (hidden 64, 4 heads, MLP width 96, SDPA) in training mode, without KV cache."""
    import transformers

    config = transformers.OPTConfig(vocab_size=101, hidden_size=64, ffn_dim=96,
                                    num_hidden_layers=layers, num_attention_heads=4,
                                    max_position_embeddings=1024, word_embed_proj_dim=64,
                                    dropout=dropout, do_layer_norm_before=pre_norm,
                                    attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config).to(dtype).train()


def token_batch(batch: int, seq_len: int, vocab: int = 101, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=generator)


def assert_matches_reference(model, ids, backend, *, tol: float = 1e-4, reference=None,
                             **reference_options):
    """One training step of `model` compiled with `backend` (a LemoBackend) against the eager
    reference `lemo_forward(model, ids, ids, **reference_options)` (or `reference(...)`, e.g.
    `opt_lemo_forward`): logits, loss and every parameter gradient within `tol` (rtol and atol).
    Leaves no gradients behind; returns the compiled model."""
    from reference import lemo_forward

    lemo_forward = reference or lemo_forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    logits, loss = lemo_forward(model, ids, ids, **reference_options)
    loss.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out.logits, logits, rtol=tol, atol=tol)
    torch.testing.assert_close(out.loss, loss, rtol=tol, atol=tol)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol, msg=name)
    return compiled


def assert_equals_plain_model(compiled, model, ids, *, grad_rtol: float = 1e-5):
    """One training step of `compiled` (`model` compiled) against `model` itself: logits and loss
    within 1e-5, every parameter gradient within rtol `grad_rtol`, atol 1e-5. Leaves no gradients
    behind; returns the compiled step's output."""
    got = compiled(input_ids=ids, labels=ids)
    got.loss.backward()
    got_grads = grads(model)
    model.zero_grad(set_to_none=True)
    want = model(input_ids=ids, labels=ids)
    want.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(got_grads[name], grad, rtol=grad_rtol, atol=1e-5, msg=name)
    model.zero_grad(set_to_none=True)
    return got


def grads(model) -> dict[str, torch.Tensor]:
    """Copies of the parameters' gradients, by name (parameters without one left out)."""
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def peft_bf16_llama(*, checkpointing: bool = False, float32_adapters: bool = True,
                    layers: int = 4):
    """A bf16 `tiny_llama` with LoRA adapters (r=4) on q/k/v/o, in float32 as PEFT makes them by
    default (`float32_adapters`), and HF gradient checkpointing when `checkpointing`."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(dtype=torch.bfloat16, layers=layers)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapters = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, adapters, autocast_adapter_dtype=float32_adapters)


def compiled_step(model, options: dict, seq_len: int = 256):
    """One training step of `model` compiled by a LemoBackend with `options`, on one sequence of
    `seq_len` tokens: (loss, gradients, the training report of the graph with sparse layers)."""
    import warnings

    import lemo_compile

    backend = lemo_compile.LemoBackend(options)
    ids = token_batch(1, seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
    loss.backward()
    (report,) = [r for r in backend.reports if r.training and "sparse_layers" in r.counters]
    return loss.detach(), grads(model), report


def inserted_nodes(gm) -> dict:
    """Per layer, a Counter of the roles of the nodes lemo inserted into the graph module gm."""
    from collections import Counter

    roles: dict[int, Counter] = {}
    for node in gm.graph.nodes:
        tag = node.meta.get("custom") or {}
        if "lemo_layer" in tag:
            roles.setdefault(tag["lemo_layer"], Counter())[tag["lemo"]] += 1
    return roles
