"""lemo under FSDP2 data parallelism on the CPU: two processes (gloo), each decoder layer and the
root sharded with `fully_shard`, the layers compiled one by one with `compile_decoder_layers`,
PEFT LoRA adapters, with and without HF gradient checkpointing, against one process running the
whole batch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_llama, token_batch

import lemo_compile

STEPS = 3
BATCH, SEQ_LEN = 2, 256
OPTIONS = {"compiler": "aot_eager", "loss_segment": None}


def _lora_model(checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(layers=4)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))


def _train(model, ids: torch.Tensor) -> list[float]:
    """STEPS steps of SGD on the adapters over the rows `ids`; the loss of each step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _sharded_worker(rank: int, world: int, port: int, out: str, checkpointing: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch._dynamo.reset()
        model = _lora_model(checkpointing)
        backends = lemo_compile.compile_decoder_layers(model, OPTIONS)
        for layer in lemo_compile.layerwise.decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        rows = token_batch(BATCH, SEQ_LEN)[rank::world]  # this rank's share of the global batch
        losses = torch.tensor(_train(model, rows))
        dist.all_reduce(losses)  # every rank holds the same number of tokens: the mean is the loss
        reports = [r for b in backends for r in b.reports if r.training]
        result = {
            "losses": (losses / world).tolist(),
            "graphs": [len(b.reports) for b in backends],
            "sparse_layers": sum(r.counters.get("sparse_layers", 0) for r in reports),
            "warnings": [w for r in reports for w in r.warnings],
        }
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_sharded_processes_train_like_one(tmp_path, fresh_dynamo, checkpointing):
    out = str(tmp_path / "rank")
    mp.spawn(_sharded_worker, args=(2, _free_port(), out, checkpointing), nprocs=2, join=True)
    results = [json.load(open(f"{out}.{rank}")) for rank in range(2)]

    model = _lora_model(checkpointing)
    backends = lemo_compile.compile_decoder_layers(model, OPTIONS)
    want = _train(model, token_batch(BATCH, SEQ_LEN))
    # The dense group's graphs: layers 0, 1 and 3, and without checkpointing one more for layer 0
    # (its input, the frozen embedding's output, needs no gradient; HF's checkpointing makes it
    # need one). The sparse group's: layer 2.
    graphs = [1, 1] if checkpointing else [2, 1]
    assert [len(b.reports) for b in backends] == graphs

    for result in results:
        # the same losses step after step: the sharded gradients are the whole batch's
        assert result["losses"] == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert want[0] - want[-1] > 0.01  # the steps move the loss, 1000x the tolerance
        assert result["graphs"] == graphs  # as above: no more graphs, no recompilation
        assert result["sparse_layers"] == 1 and result["warnings"] == []
