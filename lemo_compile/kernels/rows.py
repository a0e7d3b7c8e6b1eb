"""Moving kept token rows in and out of the residual stream (LeMo's permutation-free kernels).

Shapes: x [B, S, D] the residual stream (any strides, a batch stride of 0 included), idx [B, K]
int64 token indices, distinct and sorted per row, rows [B, K, D].

* `gather_rows`: x[b, idx[b, j]] -> [B, K, D]. The backward of a scatter, and the cos/sin gathers.
* `scatter_add_rows`: x with rows added at idx, in one pass and without a zero-padded [B, S, D]
  intermediate; the residual add of a sparse block, and the backward of a gather folded into the
  residual stream's gradient.
* `gather_rms_norm`: the selective-load RMSNorm: reads only the kept rows of x and returns the
  normalised rows, the rows themselves and 1/rms (what the norm's backward needs), with the
  numerics of Hugging Face's RMSNorm: `weight * (x.float() * rstd).to(x.dtype)`.
* `gather_layer_norm`: the same for LayerNorm (OPT): `F.layer_norm` of the kept rows (statistics in
  float32, output in x's dtype), returning the rows, their mean and 1/std as well.

Each has a pure-torch reference (`*_reference`) and a Triton launcher (`*_triton`); one program
handles one row of D elements (D up to 16384).
"""

from __future__ import annotations

import torch

from lemo_compile.kernels import HAS_TRITON, launch, next_power_of_2, tl, triton

MAX_WIDTH = 16384


def triton_supports(width: int) -> bool:
    """Whether the row kernels handle rows of `width` elements."""
    return HAS_TRITON and width <= MAX_WIDTH


def _row_launch(width: int) -> dict:
    block = max(16, next_power_of_2(width))
    return {"BLOCK_D": block, "num_warps": 4 if block <= 2048 else 8}


def _index_of(idx: torch.Tensor, width: int) -> torch.Tensor:
    return idx[:, :, None].expand(-1, -1, width)


# ------------------------------------------------------------------------------------ references


def gather_rows_reference(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, j], :] -> [B, K, D]; x may have batch 1 (broadcast over idx's batch)."""
    x = x.expand(idx.shape[0], *x.shape[1:])
    return x.gather(1, _index_of(idx, x.shape[2]))


def scatter_add_rows_reference(
    x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """x + rows placed at idx -> [B, S, D] in x's dtype; other rows of x pass through unchanged."""
    return x.scatter_add(1, _index_of(idx, x.shape[2]), rows.to(x.dtype))


def gather_rms_norm_reference(
    x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [B, K, D], rows [B, K, D], rstd [B, K, 1] float32) of RMSNorm over the kept rows."""
    rows = gather_rows_reference(x, idx)
    h = rows.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h * rstd).to(x.dtype), rows, rstd


def gather_layer_norm_reference(
    x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [B, K, D], rows [B, K, D], mean [B, K, 1], rstd [B, K, 1]) of LayerNorm over the kept
    rows; mean and rstd in float32."""
    rows = gather_rows_reference(x, idx)
    h = rows.float()
    mean = h.mean(-1, keepdim=True)
    rstd = torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + eps)
    y = ((h - mean) * rstd * weight.float() + bias.float()).to(x.dtype)
    return y, rows, mean, rstd


def layer_norm_rows_backward_reference(
    grad_y: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d rows, d weight, d bias) of `gather_layer_norm`'s y, all math in float32."""
    g = grad_y.float()
    normed = (rows.float() - mean) * rstd
    grad_weight = (g * normed).sum(dim=(0, 1)).to(weight.dtype)
    grad_bias = g.sum(dim=(0, 1)).to(weight.dtype)
    grad_normed = g * weight.float()
    grad_rows = rstd * (
        grad_normed
        - grad_normed.mean(-1, keepdim=True)
        - normed * (grad_normed * normed).mean(-1, keepdim=True)
    )
    return grad_rows.to(rows.dtype), grad_weight, grad_bias


def rms_norm_rows_backward_reference(
    grad_y: torch.Tensor, rows: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rows [B, K, D] in rows' dtype, d weight) of `gather_rms_norm`'s y, all math in float32."""
    g = grad_y.float()
    normed = rows.float() * rstd
    grad_weight = (g * normed.to(rows.dtype).float()).sum(dim=(0, 1)).to(weight.dtype)
    grad_normed = g * weight.float()
    mean = (grad_normed * normed).mean(-1, keepdim=True)
    return (rstd * (grad_normed - normed * mean)).to(rows.dtype), grad_weight


# -------------------------------------------------------------------------------------- launchers


def gather_rows_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    batch, kept = idx.shape
    width = x.shape[2]
    out = x.new_empty((batch, kept, width))
    if out.numel():
        launch(_gather_rows_kernel)[(batch * kept,)](
            x, idx, out,
            0 if x.shape[0] == 1 else x.stride(0), x.stride(1), x.stride(2),
            idx.stride(0), idx.stride(1), kept, width,
            **_row_launch(width),
        )
    return out


def scatter_add_rows_triton(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    batch, seq_len, width = x.shape
    kept = idx.shape[1]
    # slot[b, s]: which row of `rows` lands on token s, or -1. Small ([B, S] int32) and lets every
    # output row be written once, with no atomics.
    slot = torch.full((batch, seq_len), -1, dtype=torch.int32, device=x.device)
    order = torch.arange(kept, dtype=torch.int32, device=x.device).expand(batch, kept)
    slot.scatter_(1, idx, order)
    out = torch.empty((batch, seq_len, width), dtype=x.dtype, device=x.device)
    if out.numel():
        launch(_scatter_add_rows_kernel)[(batch * seq_len,)](
            x, slot, rows, out,
            x.stride(0), x.stride(1), x.stride(2),
            rows.stride(0), rows.stride(1), rows.stride(2),
            seq_len, width,
            **_row_launch(width),
        )
    return out


def gather_rms_norm_triton(
    x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, kept = idx.shape
    width = x.shape[2]
    y = torch.empty((batch, kept, width), dtype=torch.promote_types(weight.dtype, x.dtype),
                    device=x.device)
    rows = x.new_empty((batch, kept, width))
    rstd = torch.empty((batch, kept, 1), dtype=torch.float32, device=x.device)
    if rows.numel():
        launch(_gather_rms_norm_kernel)[(batch * kept,)](
            x, idx, weight, y, rows, rstd,
            0 if x.shape[0] == 1 else x.stride(0), x.stride(1), x.stride(2),
            idx.stride(0), idx.stride(1), kept, width, eps,
            **_row_launch(width),
        )
    return y, rows, rstd


def gather_layer_norm_triton(
    x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, kept = idx.shape
    width = x.shape[2]
    y = x.new_empty((batch, kept, width))
    rows = x.new_empty((batch, kept, width))
    mean = torch.empty((batch, kept, 1), dtype=torch.float32, device=x.device)
    rstd = torch.empty((batch, kept, 1), dtype=torch.float32, device=x.device)
    if rows.numel():
        launch(_gather_layer_norm_kernel)[(batch * kept,)](
            x, idx, weight, bias, y, rows, mean, rstd,
            0 if x.shape[0] == 1 else x.stride(0), x.stride(1), x.stride(2),
            idx.stride(0), idx.stride(1), kept, width, eps,
            **_row_launch(width),
        )
    return y, rows, mean, rstd


# ---------------------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _load_kept_row(
        x_ptr, idx_ptr, sx_b, sx_s, sx_d, si_b, si_k, kept, width, BLOCK_D: tl.constexpr
    ):
        """This program's kept row: (its index in [B * K], columns, column mask, x's values)."""
        row = tl.program_id(0)
        b = row // kept
        token = tl.load(idx_ptr + b * si_b + (row % kept) * si_k)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < width
        x = tl.load(x_ptr + b * sx_b + token * sx_s + cols * sx_d, mask=mask, other=0.0)
        return row, cols, mask, x

    @triton.jit
    def _gather_rows_kernel(
        x_ptr, idx_ptr, out_ptr, sx_b, sx_s, sx_d, si_b, si_k, kept, width,
        BLOCK_D: tl.constexpr,
    ):
        row, cols, mask, x = _load_kept_row(
            x_ptr, idx_ptr, sx_b, sx_s, sx_d, si_b, si_k, kept, width, BLOCK_D
        )
        tl.store(out_ptr + row.to(tl.int64) * width + cols, x, mask=mask)

    @triton.jit
    def _scatter_add_rows_kernel(
        x_ptr, slot_ptr, rows_ptr, out_ptr,
        sx_b, sx_s, sx_d, sr_b, sr_k, sr_d, seq_len, width,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)  # b * S + s
        b = row // seq_len
        slot = tl.load(slot_ptr + row)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < width
        x = tl.load(x_ptr + b * sx_b + (row % seq_len) * sx_s + cols * sx_d, mask=mask)
        added = tl.load(rows_ptr + b * sr_b + slot * sr_k + cols * sr_d, mask=mask & (slot >= 0),
                        other=0.0)
        total = x.to(tl.float32) + added.to(tl.float32)
        tl.store(out_ptr + row.to(tl.int64) * width + cols, total.to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _gather_rms_norm_kernel(
        x_ptr, idx_ptr, w_ptr, y_ptr, rows_ptr, rstd_ptr,
        sx_b, sx_s, sx_d, si_b, si_k, kept, width, eps,
        BLOCK_D: tl.constexpr,
    ):
        row, cols, mask, x = _load_kept_row(
            x_ptr, idx_ptr, sx_b, sx_s, sx_d, si_b, si_k, kept, width, BLOCK_D
        )
        h = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / width + eps)
        normed = (h * rstd).to(rows_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = row.to(tl.int64) * width + cols
        tl.store(rows_ptr + out, x, mask=mask)
        tl.store(y_ptr + out, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _gather_layer_norm_kernel(
        x_ptr, idx_ptr, w_ptr, b_ptr, y_ptr, rows_ptr, mean_ptr, rstd_ptr,
        sx_b, sx_s, sx_d, si_b, si_k, kept, width, eps,
        BLOCK_D: tl.constexpr,
    ):
        row, cols, mask, x = _load_kept_row(
            x_ptr, idx_ptr, sx_b, sx_s, sx_d, si_b, si_k, kept, width, BLOCK_D
        )
        h = x.to(tl.float32)
        mean = tl.sum(h, axis=0) / width
        centred = tl.where(mask, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / width + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = row.to(tl.int64) * width + cols
        tl.store(rows_ptr + out, x, mask=mask)
        tl.store(y_ptr + out, (centred * rstd * w + bias).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)
