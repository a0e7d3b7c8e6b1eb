"""Accuracy after lemo fine-tuning: held-out loss and passkey retrieval, evaluated dense, per variant.

One run, one process, same data and seeds for every variant:

1. Corpus: the Python sources of this interpreter's standard library and installed packages, read
   as bytes (a byte-level model: 256 token ids), files split into training and held-out sets by a
   hash of their path (1 in 10 held out), so no held-out file is ever trained on.
2. Pretraining: a Llama built from a config (`--layers` x `--hidden`, random init) trained from
   scratch at `--short` tokens for `--pretrain-steps` steps (AdamW, bf16 autocast, torch.compile),
   a share `--passkey-fraction` of the rows passkey samples (below), so that the base model has
   the retrieval skill that fine-tuning must carry to the longer context.
3. Context extension: linear RoPE scaling by `--long / --short` (transformers' `rope_parameters`
   {"rope_type": "linear"}), then for each variant LoRA (r=16, alpha=32, q/k/v/o) fine-tuning at
   `--long` tokens for `--steps` steps of `--batch` sequences, from the same base weights, the same
   batches and the same seeds. A share `--passkey-fraction` (default a quarter) of the rows are
   passkey tasks (LongLoRA's test: filler sentences with "The pass key is NNNNN. Remember it." at
   a random depth, ending with "What is the pass key? The pass key is NNNNN").
4. Evaluation, dense (`model.eval()`, no grad: lemo leaves evaluation unchanged): the mean loss on
   `--eval-windows` held-out windows of `--long` tokens, and passkey accuracy (the 5 digits greedily
   decoded, exact match) at depths 0, 0.25, 0.5, 0.75 and 1, `--passkey-trials` new keys each.
   For a sparse variant also its selection on a passkey probe (`selection_report`): per depth,
   how often the fine-tuned model's selection keeps the block holding the key, and how much of it
   the base model's selection shares, against the share of blocks kept (chance); and how much of
   each fifth of the sequence it keeps (a selection blind to position keeps chance everywhere).
   And its sparse evaluation (`sparse_eval`): on one batch of held-out windows, the loss of the
   base model, of the fine-tuned one and (when `dense` ran before it) of dense LoRA's model, each
   run as lemo trains it (the variant's selection), beside its dense loss on the same windows:
   how much of the model the selection keeps. Read on one model for every variant (the base, or
   dense LoRA, which uses its long context as the base does not), it tells a selection that keeps
   what matters from one that does not, whatever the fine-tuning then makes of it.
   After dense LoRA, on the base model and on dense LoRA's: `selection_study` (how much of the
   model each way of choosing the same number of blocks keeps, run sparse) and `gradient_study`
   (how closely each one's training gradient follows the dense one, and random blocks').

Variants (`--variants`):
  dense         LoRA without token elimination (lemo with keep_ratio=1.0: the same compiled base)
  oracle        lemo defaults (oracle scores, keep 0.4, first half of the layers and the last dense)
  random        random block selection (`scorer="random"`, seeded): one fixed pattern per layer,
                the same blocks dropped at every step and in every row
  random-fresh  random block selection drawn anew at every step (`scorer="random"`, no seed): the
                random-token-drop baseline the selection must beat
  explore       the oracle's best half of the kept blocks, the other half drawn anew at every
                step (`explore=0.5`, no seed)
  distance      the oracle with its tiles normalized per block distance (`distance_normalized`:
                the plain sums favour the middle of a row)
  edges         the oracle with each row's first and last blocks always kept
                (`keep_first_blocks=1, keep_last_blocks=1`: the passkey's question and answer
                sit in the last block)
  predictor     lemo with trained predictors (`scorer="predictor"`): `lemo_compile.calibrate` on the
                context-extended base model (frozen) over the fine-tuning batches, for
                `--calibrate-steps` steps, then fine-tuning as oracle does with the predictors'
                selection; its row also gives the predictors' recall and overlap against the
                oracle on the passkey probe's rows (`lemo_compile.predictor_recall`)
  tokens        lemo with mlp="tokens"
  channels      lemo with mlp="channels"
  keep06        lemo with keep_ratio=0.6
  then-dense    `SparsitySchedule.sparse_then_dense(0.75)`: oracle for 75% of the steps, then dense
                with gradient checkpointing
  then-dense-90 the same with 90% of the steps sparse (`sparse_then_dense(0.9)`)
  warmup        a keep-ratio warm-up: keep 0.7 for the first 25% of the steps, then 0.4 (oracle;
                every step sparse)
  rising        keep 0.4 for 50% of the steps, 0.7 for 25%, then dense as then-dense ends (oracle;
                75% of the steps sparse, as then-dense, with a milder way out)
  warmup-then-dense  rising's control: the same phases with the keep-0.7 one first (keep 0.7 for
                25% of the steps, 0.4 for 50%, then dense): as many kept tokens, in another order
  rising-90     rising with 90% of the steps sparse: keep 0.4 for 65%, 0.7 for 25%, then dense
                (does the keep-0.7 quarter stand in for dense steps? against then-dense-90)
  layerwise     oracle with per-layer keep ratios from `lemo_compile.layer_keep_ratios` (the same
                mean keep ratio over the sparse layers, more for the layers whose oracle scores
                are spread), measured on the extended base model over the first 4 batches
  output        `scorer="output"`: each sparse layer keeps the blocks whose dense attention
                results have the largest norm (an oracle of what eliminating a row takes; it runs
                the attention twice, so it is a measurement, not a setting)
  more-layers   the oracle with the sparse layers from a quarter of the depth to the
                second-to-last (8 layers: 2-6), instead of from half (4-6)
  fewer-layers  the same from 5/8 of the depth (8 layers: 5-6); `long_context.py --sparse-from`
                prices both at any depth
  weighted      the oracle with `dropped_loss_weight=0.5`: a token's loss counts 0.5 + 0.5 x the
                share of the sparse layers that kept it (the adapters tuned less to what the
                thinner model does with the dropped tokens)
  kept-loss     the same with `dropped_loss_weight=0.0`: a token's loss counts by that share
                alone (a token every sparse layer dropped does not count)
  random-kept-loss  random-fresh with `dropped_loss_weight=0.0`: the weighting without the
                oracle's selection
  then-dense-kept-loss  then-dense with its sparse phase weighted as kept-loss's
  then-dense-random  then-dense with its sparse phase drawing random blocks anew at every step
                (random-fresh's selection): does the recommended schedule need the oracle?
  corrected     the oracle at every step, and every 4th step (`--correction-period`, from the
                first) also dense on the same batch: that step takes the dense gradient and keeps
                sparse minus dense, which the steps between subtract from their sparse gradients
                (a control variate for what dropping tokens does to the gradient; 5 passes per 4
                steps, 1 dense)
  interleaved   corrected's control: every 4th step (`--correction-period`) dense instead of
                sparse, the others the oracle, nothing subtracted (4 passes per 4 steps, 1 dense)

`--keep-ratio K` (default 0.4, lemo's) is the keep ratio of every sparse variant's selection but
dense, keep06 and the keep-0.7 phases of warmup and the rising schedules (`KEEPS_ITS_OWN`):
the keep-ratio sweep of the selection against random blocks. Every row records it as
`base_keep_ratio`.

Prints a table last and writes one JSON line per variant (plus one for the base model) to --out.

    python benchmarks/accuracy.py --out accuracy.jsonl                      # the H200 default
    python benchmarks/accuracy.py --smoke                                   # a tiny CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import sysconfig
import time
import zlib

import torch

# the variants that change phase
SCHEDULES = ("then-dense", "then-dense-90", "warmup", "rising", "warmup-then-dense", "rising-90",
             "then-dense-kept-loss", "then-dense-random")
# the layer sweep: where the sparse layers start, as a share of the depth (the default: 0.5)
SPARSE_FROM = {"more-layers": 0.25, "fewer-layers": 0.625}
# loss weighting: the variant's `dropped_loss_weight` (the oracle's selection)
LOSS_WEIGHTS = {"weighted": 0.5, "kept-loss": 0.0}
# lemo's default keep ratio, --keep-ratio's default
DEFAULT_KEEP_RATIO = 0.4
# "corrected" and "interleaved": every CORRECTION_PERIOD-th step runs dense (`corrected_steps`),
# by default
CORRECTION_PERIOD = 4
PERIODIC = ("corrected", "interleaved")
# variants whose keep ratio --keep-ratio does not set
KEEPS_ITS_OWN = ("dense", "keep06")
VARIANTS = ("dense", "oracle", "random", "random-fresh", "explore", "edges", "distance",
            "predictor", "tokens", "channels", "keep06", "layerwise", "output", *SCHEDULES,
            *SPARSE_FROM, *LOSS_WEIGHTS, "random-kept-loss", *PERIODIC)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def load_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out): uint8 tensors of concatenated .py files (each followed by a blank
    line), at most `max_bytes` each; a file is held out when crc32(path) % 10 == 0."""
    roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]})
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    sizes = {True: 0, False: 0}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                held = zlib.crc32(os.path.relpath(path, root).encode()) % 10 == 0
                if sizes[held] >= max_bytes:
                    continue
                try:
                    with open(path, "rb") as f:
                        text = f.read() + b"\n\n"
                except OSError:
                    continue
                parts[held].append(text)
                sizes[held] += len(text)
    train, held_out = (torch.frombuffer(bytearray(b"".join(parts[h])[:max_bytes]),
                                        dtype=torch.uint8) for h in (False, True))
    return train, held_out


def windows(data: torch.Tensor, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """count random windows [count, length] (int64) of data."""
    starts = torch.randint(0, data.numel() - length, (count,), generator=generator)
    return torch.stack([data[s:s + length] for s in starts.tolist()]).long()


def passkey_sample(length: int, depth: float, key: int) -> tuple[torch.Tensor, int, int]:
    """(ids [length], answer_start, key_start): filler with the key sentence at `depth` of the
    filler, ending with the question and the 5-digit answer; answer_start is where the answer's
    digits begin, key_start where the key's digits do in the key sentence."""
    digits = f"{key:05d}".encode()
    needle = b"The pass key is " + digits + b". Remember it. " + digits + b" is the pass key. "
    question = b"What is the pass key? The pass key is "
    room = length - len(needle) - len(question) - len(digits)
    filler = (FILLER * (room // len(FILLER) + 1))[:room]
    cut = int(depth * room)
    text = filler[:cut] + needle + filler[cut:] + question + digits
    assert len(text) == length
    return (torch.tensor(list(text), dtype=torch.long), length - len(digits),
            cut + len(b"The pass key is "))


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.long,
        use_cache=False, attn_implementation="sdpa", tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(device)


def extend_context(model, factor: float) -> None:
    """Linear RoPE scaling by `factor` (positions divided by it), in place."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    theta = model.config.rope_parameters["rope_theta"]
    model.config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    device = next(model.parameters()).device
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config).to(device)


def with_passkeys(batch: torch.Tensor, fraction: float, rng: random.Random) -> torch.Tensor:
    """batch [N, L] with each row replaced, with probability `fraction`, by a passkey sample of
    length L (random depth and key), in place."""
    for row in range(batch.shape[0]):
        if rng.random() < fraction:
            batch[row] = passkey_sample(batch.shape[1], rng.random(), rng.randrange(100000))[0]
    return batch


def pretrain(model, train: torch.Tensor, args, device) -> list[float]:
    """AdamW at --short tokens, passkey rows mixed in (so the base model has the skill that the
    fine-tuning must carry to --long); returns the losses."""
    generator = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.1)
    compiled = torch.compile(model) if device.type == "cuda" else model
    losses = []
    for step in range(args.pretrain_steps):
        ids = with_passkeys(windows(train, args.short, args.pretrain_batch, generator),
                            args.passkey_fraction, rng).to(device)
        for group in optimizer.param_groups:  # linear warm-up, cosine decay
            warm = min(1.0, (step + 1) / max(1, args.pretrain_steps // 20))
            group["lr"] = args.pretrain_lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.pretrain_steps))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, args.pretrain_steps // 10) == 0:
            print(f"pretrain step {step}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return losses


def finetune_batches(train: torch.Tensor, args) -> list[torch.Tensor]:
    """The fine-tuning batches [batch, long], the same for every variant: corpus windows, a
    fraction `--passkey-fraction` of the rows replaced by passkey samples."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    rng = random.Random(args.seed + 1)
    return [with_passkeys(windows(train, args.long, args.batch, generator), args.passkey_fraction,
                          rng) for _ in range(args.steps)]


def lemo_options(variant: str, args) -> dict:
    options = {"block_size": args.block_size, "compiler": args.compiler,
               "keep_ratio": args.keep_ratio}
    if variant == "dense":
        options["keep_ratio"] = 1.0
    elif variant == "random":
        options.update(scorer="random", seed=args.seed)
    elif variant == "random-fresh":
        options.update(scorer="random", seed=None)
    elif variant == "random-kept-loss":
        options.update(scorer="random", seed=None, dropped_loss_weight=0.0)
    elif variant == "explore":
        options.update(explore=0.5, seed=None)
    elif variant == "edges":
        options.update(keep_first_blocks=1, keep_last_blocks=1)
    elif variant == "distance":
        options["distance_normalized"] = True
    elif variant == "tokens":
        options["mlp"] = "tokens"
    elif variant == "channels":
        options["mlp"] = "channels"
    elif variant == "keep06":
        options["keep_ratio"] = 0.6
    elif variant == "output":
        options["scorer"] = "output"
    elif variant in LOSS_WEIGHTS:
        options["dropped_loss_weight"] = LOSS_WEIGHTS[variant]
    elif variant in SPARSE_FROM:
        from harness import dense_layers_of

        options["dense_layers"] = dense_layers_of(SPARSE_FROM[variant], args.layers)
    return options


def selection_variant(variant: str) -> str:
    """The variant whose options a variant selects with: the schedules and "layerwise" select as
    the oracle does (the schedules until their dense phase; layerwise with its own keep ratios),
    but then-dense-random as random-fresh does."""
    if variant == "then-dense-random":
        return "random-fresh"
    return "oracle" if variant in SCHEDULES or variant == "layerwise" else variant


def schedule_of(variant: str, options: dict):
    """The `SparsitySchedule` a variant fine-tunes with, from the options it selects with
    (`selection_variant`'s); one phase for the variants that are not schedules."""
    from lemo_compile import Phase, SparsitySchedule

    keep_07 = {**options, "keep_ratio": 0.7}
    if variant in ("then-dense", "then-dense-random"):
        return SparsitySchedule.sparse_then_dense(0.75, options)
    if variant == "then-dense-kept-loss":
        return SparsitySchedule.sparse_then_dense(0.75, {**options, "dropped_loss_weight": 0.0})
    if variant == "then-dense-90":
        return SparsitySchedule.sparse_then_dense(0.9, options)
    if variant == "warmup":
        return SparsitySchedule([Phase(keep_07, fraction=0.25), Phase(options)])
    if variant in ("rising", "rising-90"):  # keep 0.4, then sparse_then_dense's phases from 0.7
        return SparsitySchedule([Phase(options, fraction=0.5 if variant == "rising" else 0.65),
                                 *SparsitySchedule.sparse_then_dense(0.25, keep_07).phases])
    if variant == "warmup-then-dense":  # rising's phases, keep 0.7 first
        return SparsitySchedule([Phase(keep_07, fraction=0.25),
                                 *SparsitySchedule.sparse_then_dense(0.5, options).phases])
    return SparsitySchedule([Phase(options)])


def finetune(base_state: dict, variant: str, batches: list[torch.Tensor], args, device):
    """A copy of the base model, context-extended, LoRA-fine-tuned with `variant`; returns it
    (adapters merged, eval mode), the training losses, per phase the layers lemo made sparse, and
    the lemo options it selected with (keep ratios per layer for "layerwise", the trained bank
    for "predictor")."""
    import lemo_compile
    from peft import LoraConfig, get_peft_model

    model = build_model(args, device)
    model.load_state_dict(base_state)
    extend_context(model, args.long / args.short)
    options = lemo_options(selection_variant(variant), args)
    if variant == "layerwise":
        options["keep_ratio"] = lemo_compile.layer_keep_ratios(
            model, [ids.to(device) for ids in batches[:4]], options=options)
        torch._dynamo.reset()
    if variant == "predictor":
        options.update(scorer="predictor", predictors=lemo_compile.calibrate(
            model, [ids.to(device) for ids in batches], options=options,
            steps=args.calibrate_steps, progress=False))
        torch._dynamo.reset()
    torch.manual_seed(args.seed + 2)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    if variant in PERIODIC:
        backends = [lemo_compile.LemoBackend(options),
                    lemo_compile.LemoBackend({**options, "keep_ratio": 1.0})]
        losses = corrected_steps(*(torch.compile(model, backend=b) for b in backends), trainable,
                                 batches, optimizer, device, period=args.correction_period,
                                 subtract=variant == "corrected")
    else:
        schedule = schedule_of(variant, options)
        losses = []
        for step, ids in enumerate(batches):
            schedule.apply(model, step, len(batches))
            ids = ids.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        backends = schedule.backends
    sparse = [sorted({p.layer for r in b.reports if r.training for p in r.plans if p.sparse})
              for b in backends if b is not None]
    merged = model.merge_and_unload()
    return merged.eval(), losses, sparse, options


def corrected_steps(sparse, dense, params: list[torch.Tensor], batches: list[torch.Tensor],
                    optimizer, device, period: int = CORRECTION_PERIOD,
                    subtract: bool = True) -> list[float]:
    """The training loop of "corrected" (`subtract`) and of its control "interleaved": `sparse`
    and `dense` map (input_ids=, labels=) to an output with `.loss` (the model compiled by lemo,
    and by lemo at keep 1.0), `params` the trainable parameters `optimizer` steps. Every
    `period`-th step (from the first) steps with `dense`'s gradient on its batch, the others
    with `sparse`'s. With `subtract`, a reference step also runs `sparse` on its batch and keeps
    the difference (sparse gradient - dense gradient) per parameter, and the steps between
    subtract the last difference from their sparse gradients (a control variate:
    `gradient_study` finds that difference much the same for every selection). Returns the
    losses stepped on (the dense loss on the reference steps)."""
    def gradient(run, ids) -> tuple[float, tuple]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = run(input_ids=ids, labels=ids).loss
        return loss.item(), torch.autograd.grad(loss, params)

    losses, difference = [], None
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        reference = step % period == 0
        if subtract or not reference:
            loss, grads = gradient(sparse, ids)
        if reference:
            loss, dense_grads = gradient(dense, ids)
            if subtract:
                difference = [g - d for g, d in zip(grads, dense_grads)]
            grads = dense_grads
        elif subtract:
            grads = [g - d for g, d in zip(grads, difference)]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    return losses


def passkey_probe(args) -> list[tuple[float, torch.Tensor, int, int]]:
    """The probe samples the selection is read on: min(`--passkey-trials`, 4) passkey samples per
    depth, as (depth, ids, key, key_start)."""
    rng = random.Random(args.seed + 5)
    return [(depth, *passkey_sample(args.long, depth, rng.randrange(100000)))
            for depth in DEPTHS for _ in range(min(args.passkey_trials, 4))]


def attention_selections(model, options: dict, ids: torch.Tensor, device):
    """(layer -> kept block indices [B, k], the sparse plans) of lemo's attention selection with
    `options` on `ids`, one batch through `lemo_compile.explain` (it runs with gradients on, so
    the batch's activations are all kept); ({}, []) when no layer is sparse."""
    import lemo_compile

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        explanation = lemo_compile.explain(model, input_ids=ids, labels=ids, options=options)
    torch._dynamo.reset()
    return (explanation.selected.get("attention", {}),
            [plan for plan in explanation.plans if plan.sparse])


def predictor_metrics(base, options: dict, args, device) -> dict | None:
    """With trained predictors in `options`, their recall and overlap against the oracle per
    sparse layer (`lemo_compile.predictor_recall`) on the passkey probe's rows, read on the
    context-extended base model they were trained on; None otherwise."""
    import lemo_compile

    if options.get("scorer") != "predictor":
        return None
    ids = torch.stack([sample[1] for sample in passkey_probe(args)]).to(device)
    metrics = lemo_compile.predictor_recall(base, options["predictors"], [ids], options=options)
    torch._dynamo.reset()
    return metrics


def kept_by_fifth(selected: dict[int, torch.Tensor], n_blocks: int) -> list[float]:
    """Per fifth of the sequence (its `n_blocks` full blocks in order), the share of its blocks
    that the selections `selected` ({layer: kept block indices [B, k]}) keep, over all rows and
    layers."""
    counts = torch.zeros(n_blocks)
    for blocks in selected.values():
        full = blocks[blocks < n_blocks]  # a partial block's index is past the full ones
        counts += torch.bincount(full.flatten(), minlength=n_blocks).float()
    rows = sum(blocks.shape[0] for blocks in selected.values())
    return [(part / rows).mean().item() for part in counts.tensor_split(5)]


def selection_report(tuned, base, variant: str, options: dict, held_out: torch.Tensor, args,
                     device) -> dict | None:
    """For a sparse variant, its attention selection on the passkey probe (`passkey_probe`), read
    on the fine-tuned model `tuned` and on the context-extended base model `base`:

    key_block_kept: per depth, the share of (sample, sparse layer) pairs whose selection on the
                    fine-tuned model keeps the block holding the key's first digit;
    answer_block_kept: the same for the block where the answer's first digit is (the question's
                    block: where retrieval happens), over all depths;
    same_as_base:   the share of the fine-tuned model's kept blocks that the base model's
                    selection keeps too (1 for a fixed pattern; about `chance` for one unrelated
                    to the input);
    kept_by_position: per fifth of the sequence (its blocks in order), the share of its blocks
                    the fine-tuned model's selection keeps, over all probe rows and sparse layers
                    (all about `chance` for a selection blind to position);
    kept_by_position_text: the same on 4 held-out corpus windows (`held_out`), not passkey rows;
    chance:         the share of blocks a sparse layer keeps.

    `options`: those `finetune` selected with. None for the dense variant."""
    if variant == "dense":
        return None
    samples = passkey_probe(args)
    ids = torch.stack([sample[1] for sample in samples]).to(device)
    selected, plans = attention_selections(tuned, options, ids, device)
    if not selected:
        return None
    before, _ = attention_selections(base, options, ids, device)
    text = windows(held_out, args.long, 4, torch.Generator().manual_seed(args.seed + 6))
    on_text, _ = attention_selections(tuned, options, text.to(device), device)
    kept: dict[str, list[bool]] = {str(depth): [] for depth in DEPTHS}
    answer_kept, shared = [], []
    for row, (depth, _, answer_start, key_start) in enumerate(samples):
        for layer, blocks in selected.items():
            chosen = set(blocks[row].tolist())
            kept[str(depth)].append(key_start // args.block_size in chosen)
            answer_kept.append(answer_start // args.block_size in chosen)
            shared.append(len(chosen & set(before[layer][row].tolist())) / len(chosen))
    n_blocks = args.long // args.block_size
    return {"key_block_kept": {depth: sum(flags) / len(flags) for depth, flags in kept.items()},
            "answer_block_kept": sum(answer_kept) / len(answer_kept),
            "same_as_base": sum(shared) / len(shared),
            "kept_by_position": kept_by_fifth(selected, n_blocks),
            "kept_by_position_text": kept_by_fifth(on_text, n_blocks),
            "chance": sum(p.kept_blocks / p.n_blocks for p in plans) / len(plans)}


def held_out_windows(held_out: torch.Tensor, args) -> torch.Tensor:
    """The `--eval-windows` held-out windows [N, --long] the loss is evaluated on, the same for
    every variant and every evaluation."""
    return windows(held_out, args.long, args.eval_windows, torch.Generator().manual_seed(args.seed + 3))


def sparse_eval(model, options: dict, held_out: torch.Tensor, args, device) -> dict:
    """How much of `model` lemo's selection with `options` keeps: {"dense": loss, "sparse": loss}
    on the same `--batch` held-out windows of `--long` tokens (the first ones `evaluate` reads),
    run dense and run as lemo trains it (gradients on, so the graph is rewritten; no backward).
    At one keep ratio a lower sparse loss means a selection that keeps more of what the model
    computes; the dense-eval loss after fine-tuning is what counts in the end."""
    import lemo_compile
    ids = held_out_windows(held_out, args)[:args.batch].to(device)
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    losses = {}
    try:
        for name in ("dense", "sparse"):
            model.train(name == "sparse")
            for p in model.parameters():  # lemo rewrites a graph only when it is differentiated
                p.requires_grad_(name == "sparse")
            run = (torch.compile(model, backend=lemo_compile.LemoBackend(options))
                   if name == "sparse" else model)
            with torch.set_grad_enabled(name == "sparse"), torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                losses[name] = run(input_ids=ids, labels=ids).loss.float().item()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
        torch._dynamo.reset()
    return losses


@torch.no_grad()
def selection_study(model, held_out: torch.Tensor, batches: list[torch.Tensor], args, device,
                    draws: int = 3) -> dict:
    """Which blocks are worth keeping, read on one model: the loss of `--batch` held-out windows
    (those `sparse_eval` reads) with the attention blocks of the oracle's sparse layers run on the
    kept blocks only, eagerly, with lemo's semantics (norm and attention on the kept rows with
    their RoPE positions, causal over the kept sequence, nothing added to the other rows; the MLP
    dense), under four selections of the same k blocks a layer, each from scores read in one
    dense forward: "oracle" (lemo's sigma, `predictors.calibrate.oracle_scores`), "update" (the
    blocks whose attention outputs have the largest mean norm: what eliminating a row takes; as
    `scorer="output"` ranks them), "update-max" (by their largest row's norm, as the MLP's scorer
    ranks its blocks), "update-learned" (by the mean of a per-token network's guess of that norm
    from the attention input alone: `fit_update_predictors` on the fine-tuning `batches`; what a
    cheap predictor could carry of "update") and "random" (`draws` uniform draws). Returns
    {"dense": loss, "oracle": loss, "update": loss, "update-max": loss, "update-learned": loss,
    "update-learned recall": the share of "update"'s kept blocks it keeps, "random": [losses]}.
    The emulated oracle's loss is lemo's own (`sparse_eval`) but for the later sparse layers,
    which lemo scores in the sparse forward."""
    from lemo_compile import ops
    from lemo_compile.predictors.calibrate import oracle_scores, recall_and_overlap

    ids = held_out_windows(held_out, args)[:args.batch].to(device)
    options = lemo_options("oracle", args)
    (sigma,), kept = oracle_scores(model, [ids], options=options)
    torch._dynamo.reset()
    layers = model.model.layers
    block = args.block_size
    blocks = ids.shape[1] // block
    predictors = fit_update_predictors(model, list(sigma), batches, device)
    outputs, guesses = {}, {}
    hooks = [layers[i].self_attn.register_forward_hook(
        lambda module, inputs, output, i=i: outputs.__setitem__(i, output[0].float().norm(dim=-1)))
        for i in sigma] + [layers[i].input_layernorm.register_forward_hook(
        lambda module, inputs, output, i=i: guesses.__setitem__(i, predictors[i](output)))
        for i in sigma]

    def loss_of(scores_of=None) -> float:
        """The batch's loss with the attention of each sparse layer i on the top kept[i] blocks
        of scores_of(i) [B, n] and the tail, chosen as lemo chooses (every layer dense when
        None)."""
        rows = {i: ops.select_tokens(scores_of(i), kept[i], block, ids.shape[1])
                for i in (sigma if scores_of else ())}
        model.eval()
        with _attention_on_rows(layers, rows), torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(input_ids=ids, labels=ids).loss.float().item()

    was_training = model.training
    dense = loss_of()
    for hook in hooks:
        hook.remove()
    generator = torch.Generator(device).manual_seed(args.seed + 5)
    losses = {"dense": dense,
              "oracle": loss_of(lambda i: sigma[i].to(device)),
              "update": loss_of(lambda i: ops.token_block_scores(outputs[i], block, mean=True)),
              "update-max": loss_of(lambda i: ops.token_block_scores(outputs[i], block)),
              "update-learned": loss_of(
                  lambda i: ops.token_block_scores(guesses[i], block, mean=True)),
              "update-learned recall": sum(recall_and_overlap(
                  ops.token_block_scores(guesses[i], block, mean=True),
                  ops.token_block_scores(outputs[i], block, mean=True), kept[i])[0]
                  for i in sigma) / len(sigma),
              "random": [loss_of(lambda i: torch.rand(len(ids), blocks, generator=generator,
                                                      device=device))
                         for _ in range(draws)]}
    model.train(was_training)
    return losses


def attention_weights(model) -> list[torch.Tensor]:
    """Every decoder layer's q/k/v/o projection weights, layer by layer in that order: the
    weights LoRA adapts, whose gradients `gradient_study` compares."""
    return [getattr(layer.self_attn, name).weight for layer in model.model.layers
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")]


def attention_weight_gradient(model, ids: torch.Tensor, rows: dict[int, torch.Tensor],
                              also=lambda: []) -> tuple[float, list, tuple]:
    """(loss, per decoder layer its flat float32 gradient of the loss over `attention_weights`
    (q, k, v, o), the gradients of the tensors that `also()` returns after the forward: hooked
    activations) of `model` on the batch ids [B, S], with the attention of each layer i in
    `rows` on the token rows rows[i] only (`_attention_on_rows`, lemo's semantics); autocast as
    the fine-tuning runs. The weights must require gradients."""
    layers = model.model.layers
    with _attention_on_rows(layers, rows), torch.autocast(
            ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss
    weights = attention_weights(model)
    grads = torch.autograd.grad(loss, weights + list(also()))
    per_layer = [torch.cat([g.float().flatten() for g in grads[4 * i: 4 * i + 4]])
                 for i in range(len(layers))]
    return loss.float().item(), per_layer, grads[len(weights):]


def gradient_study(model, ids: torch.Tensor, args, device, draws: int = 8,
                   next_ids: torch.Tensor | None = None) -> dict:
    """How well each selection's training step follows the dense one, read on one model: the
    gradient of the loss of the batch `ids` [B, S] with respect to every decoder layer's
    q/k/v/o weights (what LoRA's adapters see, through their projections), run dense and run
    with the oracle's sparse layers' attention on the kept blocks only
    (`attention_weight_gradient`, the MLP dense), under selections of the same k blocks a
    layer: "oracle" (sigma), "update" (the mean attention-output norm, as in
    `selection_study`), "taylor" (the mean over a block's rows of |<dL/do, o>|, o a row's
    attention output: the first-order change of the loss if the row lost its attention update;
    it needs the dense backward, so it is a measurement, not a selection lemo could make) and
    `draws` uniform random draws. Returns {"dense loss": float, "groups": {group: [layers]},
    "dense norm": {group: the dense gradient's norm},
    selection: {"loss": float, "cosine": {group: cosine with the dense gradient}, "norm ratio":
    {group: its norm over the dense gradient's}, "cosine with random": {group: cosine with the
    random draws' mean gradient}}} for "oracle", "update", "taylor", "random" (a list, one per
    draw; no "cosine with random"), and "random, mean of draws" (the draws' mean gradient, what
    fresh draws at every step add up to: cosine and norm ratio only); groups "all", "below"
    (the layers before the first sparse one, reached through the sparse layers' backward),
    "sparse" and "above" (None for an empty group). A selection whose gradient is far from
    the dense one and close to random's moves the adapters as random blocks do, whatever it
    keeps. With `next_ids` (another batch) also "carried over": does the oracle's difference
    from the dense gradient on `ids` (all layers) carry over to `next_ids`, as the "corrected"
    variant assumes? {"difference cosine": its cosine with the difference on `next_ids`,
    "sparse cosine": the oracle's gradient's cosine with the dense one on `next_ids`,
    "corrected cosine" and "corrected norm ratio": the same for the oracle's gradient there
    minus the difference on `ids`}."""
    from lemo_compile import ops
    from lemo_compile.predictors.calibrate import oracle_scores

    ids = ids.to(device)
    (sigma,), kept = oracle_scores(model, [ids], options=lemo_options("oracle", args))
    torch._dynamo.reset()
    layers = model.model.layers
    sparse = sorted(sigma)
    groups = {"all": list(range(len(layers))), "below": list(range(sparse[0])), "sparse": sparse,
              "above": list(range(sparse[-1] + 1, len(layers)))}

    def grouped(per_layer: list) -> dict:
        return {name: torch.cat([per_layer[i] for i in members]) if members else None
                for name, members in groups.items()}

    def cosine(a, b) -> float | None:
        return None if a is None else torch.nn.functional.cosine_similarity(a, b, dim=0).item()

    def compared(gradient: dict, random_mean: dict | None) -> dict:
        return {"cosine": {name: cosine(g, dense[name]) for name, g in gradient.items()},
                "norm ratio": {name: None if g is None else (g.norm() / dense[name].norm()).item()
                               for name, g in gradient.items()},
                **({} if random_mean is None else {"cosine with random": {
                    name: cosine(g, random_mean[name]) for name, g in gradient.items()}})}

    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    outputs = {}
    hooks = [layers[i].self_attn.register_forward_hook(
        lambda module, inputs, output, i=i: outputs.__setitem__(i, output[0])) for i in sparse]
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for w in attention_weights(model):
            w.requires_grad_(True)
        dense_loss, per_layer, output_grads = attention_weight_gradient(
            model, ids, {}, also=lambda: [outputs[i] for i in sparse])
        dense = grouped(per_layer)
        taylor = {i: (g.float() * outputs[i].float()).sum(-1).abs()
                  for i, g in zip(sparse, output_grads)}
        update = {i: outputs[i].detach().float().norm(dim=-1) for i in sparse}
        for hook in hooks:
            hook.remove()
        block = args.block_size

        def gradient_of(scores_of, batch: torch.Tensor = ids) -> tuple[float, dict]:
            rows = {i: ops.select_tokens(scores_of(i), kept[i], block, batch.shape[1])
                    for i in sparse}
            loss, per_layer, _ = attention_weight_gradient(model, batch, rows)
            return loss, grouped(per_layer)

        generator = torch.Generator(device).manual_seed(args.seed + 7)
        random_draws = [gradient_of(lambda i: torch.rand(len(ids), ids.shape[1] // block,
                                                         generator=generator, device=device))
                        for _ in range(draws)]
        random_mean = {name: None if dense[name] is None else
                       torch.stack([gradient[name] for _, gradient in random_draws]).mean(0)
                       for name in groups}
        result = {"dense loss": dense_loss, "groups": groups,
                  "dense norm": {name: None if g is None else g.norm().item()
                                 for name, g in dense.items()}}
        for name, scores_of in (
                ("oracle", lambda i: sigma[i].to(device)),
                ("update", lambda i: ops.token_block_scores(update[i], block, mean=True)),
                ("taylor", lambda i: ops.token_block_scores(taylor[i], block, mean=True))):
            loss, gradient = gradient_of(scores_of)
            result[name] = {"loss": loss, **compared(gradient, random_mean)}
            if name == "oracle":
                difference = gradient["all"] - dense["all"]
        result["random"] = [{"loss": loss, **compared(gradient, None)}
                            for loss, gradient in random_draws]
        result["random, mean of draws"] = compared(random_mean, None)
        if next_ids is not None:
            next_ids = next_ids.to(device)
            (next_sigma,), _ = oracle_scores(model, [next_ids], options=lemo_options("oracle", args))
            torch._dynamo.reset()
            next_dense = torch.cat(attention_weight_gradient(model, next_ids, {})[1])
            next_sparse = gradient_of(lambda i: next_sigma[i].to(device), next_ids)[1]["all"]
            corrected = next_sparse - difference
            result["carried over"] = {
                "difference cosine": cosine(next_sparse - next_dense, difference),
                "sparse cosine": cosine(next_sparse, next_dense),
                "corrected cosine": cosine(corrected, next_dense),
                "corrected norm ratio": (corrected.norm() / next_dense.norm()).item()}
        return result
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def fit_update_predictors(model, layers: list[int], batches: list[torch.Tensor], device,
                          steps: int = 120, lr: float = 1e-3) -> dict:
    """Per layer in `layers`, an `MlpPredictor` (h [B, S, D] -> [B, S]) fitted to the norm of the
    layer's attention output per token from the attention's input h (the input norm's output),
    on the frozen `model` run densely over `batches` (cycled) for `steps` Adam steps, fitted as
    `calibrate` fits MLP predictors (`fit_token_loss`).
    Returns {layer: predictor}, frozen, in eval mode."""
    from lemo_compile.predictors.bank import MlpPredictor
    from lemo_compile.predictors.calibrate import fit_token_loss

    blocks = model.model.layers
    predictors = {i: MlpPredictor.new(model.config.hidden_size).to(device) for i in layers}
    optimizer = torch.optim.Adam([p for net in predictors.values() for p in net.parameters()], lr=lr)
    inputs, norms = {}, {}
    hooks = [blocks[i].input_layernorm.register_forward_hook(
        lambda module, args, output, i=i: inputs.__setitem__(i, output.detach().float()))
        for i in layers] + [blocks[i].self_attn.register_forward_hook(
        lambda module, args, output, i=i: norms.__setitem__(
            i, output[0].detach().float().norm(dim=-1)))
        for i in layers]
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=device.type == "cuda"):
                model(input_ids=batches[step % len(batches)].to(device))
            with torch.enable_grad():
                loss = sum(fit_token_loss(predictors[i](inputs[i]), norms[i]) for i in layers)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {i: net.requires_grad_(False).eval() for i, net in predictors.items()}


@contextlib.contextmanager
def _attention_on_rows(layers, rows: dict[int, torch.Tensor]):
    """Within the block, the attention of each decoder layer `layers[i]` for i in `rows` runs on
    the token rows rows[i] [B, K] only (`_on_rows`); the others as they are."""
    originals = {i: layers[i].self_attn.forward for i in rows}
    for i, kept in rows.items():
        layers[i].self_attn.forward = _on_rows(originals[i], kept)
    try:
        yield
    finally:
        for i, forward in originals.items():
            layers[i].self_attn.forward = forward


def _on_rows(attention_forward, rows: torch.Tensor):
    """An attention forward that runs `attention_forward` on the rows [B, K] of its input only
    (with their RoPE cos and sin, no mask: causal over the kept rows) and returns zeros at the
    other rows."""
    def forward(hidden_states, position_embeddings, attention_mask=None, **kwargs):
        def take(t):
            t = t.expand(len(rows), -1, -1)
            return t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1]))
        cos, sin = position_embeddings
        kwargs.pop("position_ids", None)
        out, weights = attention_forward(take(hidden_states), attention_mask=None,
                                         position_embeddings=(take(cos), take(sin)), **kwargs)
        full = out.new_zeros(hidden_states.shape[:2] + out.shape[2:])
        return full.scatter(1, rows[..., None].expand(-1, -1, out.shape[-1]), out), weights
    return forward


@torch.no_grad()
def evaluate(model, held_out: torch.Tensor, args, device) -> dict:
    """Dense evaluation: held-out loss at --long tokens and passkey accuracy per depth."""
    model = model.eval()
    losses = []
    for ids in held_out_windows(held_out, args).split(args.batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses.append(model(input_ids=ids.to(device), labels=ids.to(device)).loss.float().item())
    rng = random.Random(args.seed + 4)
    accuracy = {}
    for depth in DEPTHS:
        samples = [passkey_sample(args.long, depth, rng.randrange(100000))
                   for _ in range(args.passkey_trials)]
        start = samples[0][1]  # the same in every sample: the answer ends the sequence
        prompt = torch.stack([ids[:start] for ids, _, _ in samples]).to(device)
        for _ in range(5):  # greedy decoding of the 5 digits, all trials of a depth at once
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=prompt[:, -args.long:], logits_to_keep=1).logits[:, -1]
            prompt = torch.cat([prompt, logits.argmax(-1, keepdim=True)], dim=1)
        answers = torch.stack([ids[start:start + 5] for ids, _, _ in samples])
        accuracy[str(depth)] = (prompt[:, start:].cpu() == answers).all(dim=1).float().mean().item()
    return {"held_out_loss": sum(losses) / len(losses), "passkey": accuracy}


def _gradient_text(study: dict) -> str:
    """`gradient_study`'s result in a line: per selection, its gradient's cosine with the dense
    one over all layers / below / in / above the sparse layers, its norm over the dense one's
    and its cosine with the random draws' mean gradient (all layers); the random draws' mean
    per draw beside their mean gradient's."""
    draws = study["random"]
    readings = {name: study[name] for name in ("oracle", "update", "taylor")}
    readings["one random draw (mean)"] = {
        key: {group: None if draws[0][key][group] is None else
              sum(d[key][group] for d in draws) / len(draws) for group in study["groups"]}
        for key in ("cosine", "norm ratio")}
    readings["random, mean of draws"] = study["random, mean of draws"]
    carried = study.get("carried over")
    carried_text = "" if carried is None else (
        "; the oracle's difference from dense, carried to the next batch: cosine with that "
        f"batch's difference {carried['difference cosine']:.3f}, the oracle's cosine with dense "
        f"there {carried['sparse cosine']:.3f}, corrected {carried['corrected cosine']:.3f} "
        f"({carried['corrected norm ratio']:.2f}x)")
    return (f"dense gradient norm {study['dense norm']['all']:.4f}; cosine with it, all / below "
            "/ sparse / above the sparse layers, norm over it, cosine with random's mean: "
            + "; ".join(f"{name} " + " / ".join("-" if c is None else f"{c:.3f}"
                                                for c in reading["cosine"].values())
                        + f", {reading['norm ratio']['all']:.2f}x"
                        + (f", {reading['cosine with random']['all']:.3f}"
                           if "cosine with random" in reading else "")
                        for name, reading in readings.items()) + carried_text)


def main() -> int:
    import lemo_compile

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--short", type=int, default=1024, help="pretraining length")
    parser.add_argument("--long", type=int, default=4096, help="fine-tuning and evaluation length")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per variant")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--keep-ratio", type=float, default=DEFAULT_KEEP_RATIO,
                        help="the sparse variants' keep ratio (not dense's, keep06's, nor the "
                             "keep-0.7 phases of warmup and the rising schedules)")
    parser.add_argument("--correction-period", type=int, default=CORRECTION_PERIOD,
                        help="steps per dense step of the corrected and interleaved variants")
    parser.add_argument("--calibrate-steps", type=int, default=300,
                        help="predictor training steps (the predictor variant)")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--passkey-trials", type=int, default=40)
    parser.add_argument("--passkey-fraction", type=float, default=0.25,
                        help="share of pretraining and fine-tuning rows that are passkey samples")
    parser.add_argument("--corpus-bytes", type=int, default=200_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compiler", choices=("aot_eager", "inductor"), default="aot_eager",
                        help="lemo's compiler for fine-tuning: at this model size compiling with "
                             "Inductor takes longer than the fine-tuning itself")
    parser.add_argument("--out", default="accuracy.jsonl")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny configuration that runs on a CPU in a few minutes")
    args = parser.parse_args()
    if not 0 < args.keep_ratio <= 1:
        parser.error(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    if args.correction_period < 1:
        parser.error(f"--correction-period must be >= 1, got {args.correction_period}")
    if args.smoke:
        args.layers, args.hidden, args.short, args.long = 4, 128, 256, 512
        args.pretrain_steps, args.pretrain_batch, args.steps, args.batch = 20, 4, 4, 2
        args.calibrate_steps = 4
        args.block_size, args.eval_windows, args.passkey_trials = 32, 4, 1
        args.corpus_bytes = 2_000_000
    device = torch.device(args.device)
    begin = time.perf_counter()
    train, held_out = load_corpus(args.corpus_bytes)
    print(f"corpus: {train.numel():,} training bytes, {held_out.numel():,} held out",
          file=sys.stderr, flush=True)
    model = build_model(args, device)
    pretrain_losses = pretrain(model, train, args, device)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extend_context(model, args.long / args.short)
    base = model  # the context-extended base, whose selection the fine-tuned ones are compared to
    common = {"layers": args.layers, "hidden": args.hidden, "short": args.short, "long": args.long,
              "steps": args.steps, "batch": args.batch, "seed": args.seed, "compiler": args.compiler,
              "base_keep_ratio": args.keep_ratio, "correction_period": args.correction_period,
              "pretrain_steps": args.pretrain_steps, "passkey_fraction": args.passkey_fraction,
              "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    rows = [{"variant": "base (extended, not fine-tuned)", **common,
             "pretrain_loss_last": pretrain_losses[-1], "seconds": time.perf_counter() - begin,
             **evaluate(model, held_out, args, device)}]
    with open(args.out, "a") as f:  # row by row: a run cut short keeps what it finished
        f.write(json.dumps(rows[-1]) + "\n")
    batches = finetune_batches(train, args)
    dense_lora = None  # the dense variant's model, once it ran: every selection is read on it too
    for variant in args.variants:
        started = time.perf_counter()
        tuned, losses, sparse, options = finetune(base_state, variant, batches, args, device)
        rows.append({"variant": variant, **common, "sparse_layers_per_phase": sparse,
                     "keep_ratio": lemo_compile.LemoConfig.from_options(options).keep_ratio,
                     "predictor_recall": predictor_metrics(base, options, args, device),
                     "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
                     "seconds": time.perf_counter() - started, **evaluate(tuned, held_out, args, device),
                     "selection": selection_report(tuned, base, variant, options, held_out, args,
                                                   device),
                     "sparse_eval": None if variant == "dense" else {
                         "base": sparse_eval(base, options, held_out, args, device),
                         "tuned": sparse_eval(tuned, options, held_out, args, device),
                         **({} if dense_lora is None else {
                             "dense LoRA": sparse_eval(dense_lora, options, held_out, args,
                                                       device)})}})
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        if variant == "dense":
            dense_lora = tuned
            rows.append({"variant": "selection study", **common,
                         "base": selection_study(base, held_out, batches, args, device),
                         "dense LoRA": selection_study(tuned, held_out, batches, args, device),
                         "gradients": {
                             "base": gradient_study(base, batches[0], args, device,
                                                    next_ids=batches[1]),
                             "dense LoRA": gradient_study(tuned, batches[0], args, device,
                                                          next_ids=batches[1])}})
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        del tuned
        torch._dynamo.reset()
    dense = next((r["held_out_loss"] for r in rows if r["variant"] == "dense"), None)
    print(f"\n{'variant':<32} {'held-out loss':>13} {'vs dense':>8}  passkey by depth {DEPTHS}"
          "  key block kept by depth; answer block; same as base (chance);"
          " kept by fifth of the sequence; sparse against dense loss, base / fine-tuned"
          " / dense LoRA")
    for row in rows:
        if row["variant"] == "selection study":
            continue
        versus = f"{row['held_out_loss'] / dense - 1:+.1%}" if dense else ""
        selection = row.get("selection")
        kept_text = "" if not selection else "  " + " ".join(
            f"{selection['key_block_kept'][str(d)]:.2f}" for d in DEPTHS) + (
            f"; {selection['answer_block_kept']:.2f}; {selection['same_as_base']:.2f} "
            f"({selection['chance']:.2f}); by fifth "
            + " ".join(f"{share:.2f}" for share in selection["kept_by_position"]) + " (text "
            + " ".join(f"{share:.2f}" for share in selection["kept_by_position_text"]) + ")")
        if row.get("sparse_eval"):
            kept_text += "; sparse eval " + "/".join(row["sparse_eval"]) + " " + " / ".join(
                f"{losses['sparse'] / losses['dense'] - 1:+.1%}"
                for losses in row["sparse_eval"].values())
        if row.get("predictor_recall"):
            layers = row["predictor_recall"].values()
            kept_text += f"; predictor recall {sum(m['recall'] for m in layers) / len(layers):.2f}"
        print(f"{row['variant']:<32} {row['held_out_loss']:>13.4f} {versus:>8}  "
              + " ".join(f"{row['passkey'][str(d)]:.2f}" for d in DEPTHS) + kept_text)
    for row in rows:
        if row["variant"] == "selection study":
            for model_name in ("base", "dense LoRA"):
                study = row[model_name]
                losses = {"oracle": study["oracle"], "update": study["update"],
                          "update-max": study["update-max"],
                          "update-learned": study["update-learned"],
                          "random": sum(study["random"]) / len(study["random"])}
                print(f"selection study on {model_name}, sparse against dense loss: " + ", ".join(
                    f"{name} {loss / study['dense'] - 1:+.1%}" for name, loss in losses.items()))
                print(f"gradient study on {model_name}: "
                      + _gradient_text(row["gradients"][model_name]))
    print(f"total {time.perf_counter() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
