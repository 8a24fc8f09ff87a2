"""GPTQ for the factors of a delta: one layer input's Hessian and the column-by-column quantization loop.

``GPTQ`` accumulates ``H = 2/N Σ x xᵀ`` over the ``N`` input vectors of one linear (the same running average as the
reference GPTQ implementation) and quantizes a weight whose reduction dimension is that input, minimising the output
error ``||(W − Q) X||`` column by column: each column is rounded, and its error is pushed onto the columns not yet
quantized through the Cholesky factor of ``H⁻¹`` (blocks of 128 columns with lazy batch updates).

Delta-CoMe needs two twists on the textbook loop:

* **per-row bit widths** — the bands of ``Vᵀ`` are row blocks at different bit widths (8/3/2 bits). They share one
  input, so all bands are quantized in *one* pass (:meth:`GPTQ.quantize_row_bands`);
* **per-column-segment bit widths** — the columns of ``U`` are the bands. Groups never straddle a band boundary, so
  the result splits into one `QuantizedMatrix` per band (:meth:`GPTQ.quantize_column_bands`).

Quantization is asymmetric with scales from :func:`packing.asymmetric_params`, so the float16 scales used inside the
loop are exactly the stored ones. With ``act_order`` columns are visited by decreasing Hessian diagonal and group
parameters come from the un-updated weight ("static groups"), so the stored column order stays the original one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import DeltaCoMeError
from ..format.packing import SUPPORTED_BITS, QuantizedMatrix
from .cholesky import inverse_cholesky
from .rtn import asymmetric_params, grid_params
from .spill import Hessian, SpilledHessian

DEFAULT_BLOCK_SIZE = 128
_HESSIAN_BLOCK = 2048  # columns of x xᵀ formed at a time by GPTQ.add_batch


class GPTQ:
    """Hessian of one linear's input plus the GPTQ column loop.

    Args:
        columns: size of the input (reduction) dimension.
        device: where the Hessian lives (default CPU).
        dtype: accumulation dtype of the Hessian (float32 as in the reference implementation, or float64).
        name: used in warnings and errors (e.g. the module name).
    """

    def __init__(
        self,
        columns: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        name: str = "",
    ) -> None:
        if columns <= 0:
            raise DeltaCoMeError(f"GPTQ{_where(name)}: number of columns must be positive, got {columns}")
        self.columns = columns
        self.name = name
        self.H = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.nsamples = 0
        self.last_error: float | None = None  # sum of squared, Hessian-weighted rounding errors of the last call
        self.last_errors: torch.Tensor | None = None  # the same sum split by row and column (original column order)
        self.used_damp: float | None = None  # damping that the last call actually needed

    @classmethod
    def from_hessian(cls, hessian: Hessian, *, nsamples: int = 1, name: str = "", copy: bool = True) -> GPTQ:
        """A `GPTQ` around a ready Hessian (e.g. ``A H Aᵀ`` for the input of ``U``), no data pass needed.

        ``copy=False`` shares ``hessian`` (float32 / float64) instead of copying it: quantizing only reads it, so a
        caller that already made its own copy need not pay for another (0.97 GB for a 7B down_proj in float64).
        A :class:`~.spill.SpilledHessian` is always shared (read from its file when the loop needs it)."""
        if len(hessian.shape) != 2 or hessian.shape[0] != hessian.shape[1]:
            raise DeltaCoMeError(f"GPTQ{_where(name)}: Hessian must be square, got shape {tuple(hessian.shape)}")
        dtype = hessian.dtype if hessian.dtype in (torch.float32, torch.float64) else torch.float32
        if hessian.shape[0] <= 0:
            raise DeltaCoMeError(f"GPTQ{_where(name)}: number of columns must be positive, got {hessian.shape[0]}")
        g = cls(1, device="meta", dtype=dtype, name=name)  # no n x n zeros to replace (0.97 GB for a 7B down_proj)
        g.columns = hessian.shape[0]
        if isinstance(hessian, SpilledHessian):
            g.H = hessian
        else:
            g.H = hessian.to(dtype) if not copy else hessian.to(dtype, copy=True)
        g.nsamples = nsamples
        return g

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold the input vectors ``x`` (``(..., columns)``) into the running average ``H = 2/N Σ x xᵀ``."""
        if x.shape[-1] != self.columns:
            raise DeltaCoMeError(
                f"GPTQ{_where(self.name)}: input has {x.shape[-1]} features, the Hessian expects {self.columns}"
            )
        if isinstance(self.H, SpilledHessian):
            raise DeltaCoMeError(f"GPTQ{_where(self.name)}: the Hessian was spilled to disk; it takes no more inputs")
        x = x.reshape(-1, self.columns).to(device=self.H.device, dtype=self.H.dtype)
        t = x.shape[0]
        if t == 0:
            return
        self.H *= self.nsamples / (self.nsamples + t)
        self.nsamples += t
        x = math.sqrt(2.0 / self.nsamples) * x
        # a block of columns at a time: no second n x n matrix (0.45 GiB for a 7B down_proj); each entry is the
        # same dot product over the tokens as in one product
        for j in range(0, self.columns, _HESSIAN_BLOCK):
            self.H[:, j : j + _HESSIAN_BLOCK] += x.t() @ x[:, j : j + _HESSIAN_BLOCK]

    # ------------------------------------------------------------------ public quantizers

    def quantize(
        self,
        W: torch.Tensor,
        bits: int,
        group_size: int,
        damp: float = 0.01,
        act_order: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> QuantizedMatrix:
        """GPTQ-quantize ``W`` (``rows x columns``) at ``bits`` bits in groups of ``group_size`` columns."""
        out = self.quantize_row_bands(W, [(bits, W.shape[0])], group_size, damp, act_order, block_size)
        return out[0]

    def quantize_row_bands(
        self,
        W: torch.Tensor,
        bands: Sequence[tuple[int, int]],
        group_size: int,
        damp: float = 0.01,
        act_order: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> list[QuantizedMatrix | None]:
        """Quantize ``W`` whose consecutive row blocks ``[(bits, n_rows), ...]`` have their own bit widths.

        One GPTQ pass over all rows (they share the input and its Hessian); returns one `QuantizedMatrix` per band,
        ``None`` for bands of zero rows.
        """
        rows, cols = self._check_w(W)
        bands = _check_bands(bands, rows, "rows", self.name)
        row_bits = torch.cat([torch.full((r,), b, dtype=torch.float32) for b, r in bands]) if rows else None
        n_groups = math.ceil(cols / group_size)
        gidx = torch.arange(cols) // group_size
        bits_table = row_bits.view(rows, 1).expand(rows, n_groups) if rows else torch.zeros(0, n_groups)
        codes, scales, zeros, dq = self._run(W, gidx, n_groups, bits_table, group_size, damp, act_order, block_size)
        out: list[QuantizedMatrix | None] = []
        start = 0
        for b, r in bands:
            sl = slice(start, start + r)
            start += r
            out.append(None if r == 0 else _pack(b, group_size, codes[sl], scales[sl], zeros[sl], dq[sl]))
        return out

    def quantize_column_bands(
        self,
        W: torch.Tensor,
        bands: Sequence[tuple[int, int]],
        group_size: int,
        damp: float = 0.01,
        act_order: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> list[QuantizedMatrix | None]:
        """Quantize ``W`` whose consecutive column segments ``[(bits, n_cols), ...]`` have their own bit widths.

        Groups restart at each segment, so each segment is a self-contained `QuantizedMatrix` (returned per band,
        ``None`` for bands of zero columns); the error compensation still spans all segments.
        """
        rows, cols = self._check_w(W)
        bands = _check_bands(bands, cols, "columns", self.name)
        gidx_parts, bits_parts, seg_groups = [], [], []
        g0 = 0
        for b, c in bands:
            ng = math.ceil(c / group_size)
            gidx_parts.append(g0 + torch.arange(c) // group_size)
            bits_parts.append(torch.full((ng,), b, dtype=torch.float32))
            seg_groups.append((g0, g0 + ng))
            g0 += ng
        gidx = torch.cat(gidx_parts)
        bits_table = torch.cat(bits_parts).view(1, g0).expand(rows, g0)
        codes, scales, zeros, dq = self._run(W, gidx, g0, bits_table, group_size, damp, act_order, block_size)
        out: list[QuantizedMatrix | None] = []
        start = 0
        for (b, c), (ga, gb) in zip(bands, seg_groups, strict=True):
            sl = slice(start, start + c)
            start += c
            if c == 0:
                out.append(None)
                continue
            out.append(_pack(b, group_size, codes[:, sl], scales[:, ga:gb], zeros[:, ga:gb], dq[:, sl]))
        return out

    def quantize_columns_transposed(
        self,
        W: torch.Tensor,
        bands: Sequence[tuple[int, int]],
        group_size: int,
        damp: float = 0.01,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> list[QuantizedMatrix | None]:
        """Quantize ``W`` (``rows x cols``) column by column, each column with its own scale and zero per group of
        ``group_size`` rows, and return each column segment ``[(bits, n_cols), ...]`` as the `QuantizedMatrix` of its
        *transpose* (``n_cols x rows``, groups along ``rows``), ``None`` for bands of zero columns.

        This is the storage of a delta's ``U`` (format 2): one scale per singular vector and group of output rows,
        so a band's overhead grows with its rank, not with the layer's output width. The column loop and its error
        feedback are GPTQ's own; a column's parameters come from the column as it stands when it is visited.
        """
        rows, cols = self._check_w(W)
        bands = _check_bands(bands, cols, "columns", self.name)
        col_bits = torch.cat([torch.full((c,), b, dtype=torch.float32) for b, c in bands]) if cols else None
        bits_table = col_bits.view(1, cols).expand(rows, cols) if cols else torch.zeros(rows, 0)
        gidx = torch.arange(cols)
        codes, scales, zeros, dq = self._run(
            W, gidx, cols, bits_table, group_size, damp, False, block_size, row_group=group_size
        )
        out: list[QuantizedMatrix | None] = []
        start = 0
        for b, c in bands:
            sl = slice(start, start + c)
            start += c
            if c == 0:
                out.append(None)
                continue
            # one parameter per group of rows: the first row of each group holds it
            firsts = slice(0, rows, group_size)
            out.append(_pack(b, group_size, codes[:, sl].t(), scales[firsts, sl].t(), zeros[firsts, sl].t(),
                             dq[:, sl].t()))  # fmt: skip
        return out

    def quantize_groups(
        self,
        W: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        damp: float = 0.01,
        act_order: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``W`` whose consecutive column groups ``[(bits, n_cols), ...]`` each have their own bit width
        *and length* (one scale and zero per row and group), in one pass: per-group mixed precision inside one
        layer (AMLQ, which sorts the groups into its storage planes itself).

        Returns integer codes (rows x cols), scales and zeros (rows x groups) and the dequantized matrix, columns in
        the original order; :attr:`last_errors` splits :attr:`last_error` by entry, so a caller can split it by group.
        """
        rows, cols = self._check_w(W)
        groups = _check_bands(groups, cols, "columns", self.name)
        if any(c == 0 for _, c in groups):
            raise DeltaCoMeError(f"GPTQ{_where(self.name)}: column groups must not be empty, got {groups}")
        lengths = torch.tensor([c for _, c in groups])
        gidx = torch.repeat_interleave(torch.arange(len(groups)), lengths)
        bits_table = torch.tensor([float(b) for b, _ in groups]).view(1, -1).expand(rows, len(groups))
        return self._run(W, gidx, len(groups), bits_table, int(lengths.max()), damp, act_order, block_size)

    # ------------------------------------------------------------------ internals

    def _check_w(self, W: torch.Tensor) -> tuple[int, int]:
        if W.dim() != 2 or W.shape[1] != self.columns:
            raise DeltaCoMeError(
                f"GPTQ{_where(self.name)}: weight of shape {tuple(W.shape)} does not match a Hessian over "
                f"{self.columns} input features"
            )
        return W.shape[0], W.shape[1]

    def _run(
        self,
        W: torch.Tensor,
        gidx: torch.Tensor,
        n_groups: int,
        bits_table: torch.Tensor,
        group_size: int,
        damp: float,
        act_order: bool,
        block_size: int,
        row_group: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The column loop. ``gidx[j]`` is the group of column ``j``; ``bits_table`` is (rows, n_groups).

        With ``row_group`` every column is its own group (``gidx = arange``) and its parameters are shared by
        groups of ``row_group`` rows (which share a bit width), computed from the column when it is visited. Returns integer codes, scales,
        zeros (rows x n_groups) and the dequantized matrix, in the original column order.
        """
        if group_size < 1:
            raise DeltaCoMeError(f"GPTQ{_where(self.name)}: group_size must be positive, got {group_size}")
        device = self.H.device
        rows, cols = W.shape
        W = W.detach().to(device=device, dtype=torch.float32).clone()
        gidx = gidx.to(device)
        bits_table = bits_table.to(device)
        scales = torch.ones(rows, n_groups, dtype=torch.float32, device=device)
        zeros = torch.zeros(rows, n_groups, dtype=torch.float32, device=device)
        if rows == 0 or cols == 0:
            self.last_error = 0.0
            self.last_errors = torch.zeros(rows, cols)
            return (torch.zeros(rows, cols, dtype=torch.uint8), scales.cpu(), zeros.cpu(), W.cpu())

        # group start/end (exclusive) in original column order
        first = torch.full((n_groups,), cols, dtype=torch.long, device=device)
        first.scatter_reduce_(0, gidx, torch.arange(cols, device=device), reduce="amin")
        last = torch.zeros(n_groups, dtype=torch.long, device=device)
        last.scatter_reduce_(0, gidx, torch.arange(cols, device=device) + 1, reduce="amax")
        g_first, g_last = first.tolist(), last.tolist()

        if row_group is not None:
            # U's layout: every column is its own group and shares its parameters down groups of row_group rows
            # (which share a bit width: U's bands are column segments). The rows are zero-padded to whole groups
            # for the whole loop, so each column is viewed as (groups, row_group) and gets one grid per group
            # without copies; a zero row stays zero (it rounds to its zero point) and every grid covers 0 anyway
            pad = (-rows) % row_group
            W = F.pad(W, (0, 0, 0, pad))
            rg_bits = bits_table[::row_group]  # (row groups, columns)
            rg_top = 2.0 ** torch.where(rg_bits >= 16, 8.0, rg_bits) - 1  # the grid's top code (16 bits: 8-bit grid)
            rg_scales = torch.ones(rg_bits.shape, dtype=torch.float32, device=device)
            rg_zeros = torch.zeros(rg_bits.shape, dtype=torch.float32, device=device)

        def set_params(g: int, block: torch.Tensor) -> None:
            b = bits_table[:, g]
            s, z = asymmetric_params(block.amin(dim=1), block.amax(dim=1), torch.where(b >= 16, 8.0, b))
            scales[:, g], zeros[:, g] = s, z

        if act_order:
            # static groups: parameters from the weight before any error feedback
            for g in range(n_groups):
                set_params(g, W[:, g_first[g] : g_last[g]])
            full = self.H.load() if isinstance(self.H, SpilledHessian) else self.H
            order = torch.argsort(torch.diagonal(full).to(torch.float64), descending=True, stable=True).to(device)
            W = W[:, order]
            H = full[order][:, order]
            del full
            breaks = set(range(0, cols, block_size))
        else:
            order = torch.arange(cols, device=device)
            H = self.H
            # blocks also break at group starts, so a group's parameters see every earlier column's error feedback
            # (one-column groups need no break: the column has all of it when it is visited)
            breaks = set(range(0, cols, block_size))
            if row_group is None:
                breaks |= {f for f in g_first if f < cols}
        Hinv, self.used_damp = inverse_cholesky(H, damp, self.name)  # upper triangle meaningful
        starts = sorted(breaks) + [cols]
        order_l = order.tolist()
        gidx_l = gidx.tolist()
        any16 = (bits_table >= 16).any(dim=0).tolist()

        rows_w = W.shape[0]  # rows, or rows padded to whole row groups
        Q = torch.zeros_like(W)
        codes = torch.zeros(rows_w, cols, dtype=torch.float32, device=device)
        errors = torch.zeros(rows_w, cols, dtype=torch.float32, device=device)  # columns in visiting order
        # The loop runs a few small tensor ops per column, so it is kept to those: everything that does not change
        # along a group's columns is formed outside it, a block is held transposed (each column a contiguous row,
        # reached through a tuple of views, not tensor indexing), results are computed into their place (out=),
        # and a block's codes, values and errors are written back once. Same arithmetic, entry by entry.
        maxq = torch.where(bits_table >= 16, 0.0, 2.0**bits_table - 1)  # (rows, n_groups); 16 bits: kept in fp16
        floor = torch.zeros(rows, dtype=torch.float32, device=device)
        if row_group is not None:
            rg_max, rg_floor = maxq[::row_group], torch.zeros(rg_top.shape[0], 1, dtype=torch.float32, device=device)
        s = z = top = None  # the grid of the group being visited (not row groups)
        g_now = -1
        for i1, i2 in zip(starts[:-1], starts[1:], strict=True):
            count = i2 - i1
            Wt = W[:, i1:i2].t().contiguous()  # (count, rows): column i of the block is row i
            Qt, Ct, Et = (torch.zeros(count, rows_w, dtype=torch.float32, device=device) for _ in range(3))
            Hinv1 = Hinv[i1:i2, i1:i2].to(torch.float32)  # float32 a block at a time: no n x n float32 copy
            pivots = Hinv1.diagonal().tolist()
            w_rows, q_rows, c_rows, e_rows, h_rows = (t.unbind(0) for t in (Wt, Qt, Ct, Et, Hinv1))
            for i in range(count):
                orig = order_l[i1 + i]
                g = gidx_l[orig]
                w, q = w_rows[i], c_rows[i]
                if row_group is not None:  # (row groups, row_group) views of the column: one grid per group
                    wg, qg = w.view(-1, row_group), q.view(-1, row_group)
                    sg, zg = grid_params(*torch.aminmax(wg, dim=1), rg_top[:, g])
                    rg_scales[:, g], rg_zeros[:, g] = sg, zg
                    sg, zg = sg.unsqueeze(1), zg.unsqueeze(1)
                    torch.div(wg, sg, out=qg).round_().add_(zg).clamp_(min=rg_floor, max=rg_max[:, g : g + 1])
                    dq = torch.sub(qg, zg, out=q_rows[i].view(-1, row_group)).mul_(sg).view(-1)
                    if any16[g]:
                        sixteen = (rg_bits[:, g] >= 16).repeat_interleave(row_group)
                        torch.where(sixteen, w.to(torch.float16).to(torch.float32), dq, out=dq)
                else:
                    if g != g_now:
                        if not act_order and orig == g_first[g]:
                            # blocks break at group starts, so i == 0 and nothing of this block is pending on
                            # W[:, i2:]
                            end = g_last[g]
                            block = Wt[i : min(end, i2) - i1].t()
                            set_params(g, block if end <= i2 else torch.cat([block, W[:, i2:end]], 1))
                        s, z, top, g_now = scales[:, g], zeros[:, g], maxq[:, g], g
                    torch.div(w, s, out=q).round_().add_(z).clamp_(min=floor, max=top)
                    dq = torch.sub(q, z, out=q_rows[i]).mul_(s)
                    if any16[g]:  # per column, not a rows x cols table (a 7B gate_proj's U has 11008 rows)
                        torch.where(bits_table[:, g] >= 16, w.to(torch.float16).to(torch.float32), dq, out=dq)
                err = torch.sub(w, dq, out=e_rows[i]).div_(pivots[i])
                if i + 1 < count:  # column i itself is done: only the later ones take its error
                    Wt[i + 1 :].sub_(torch.outer(h_rows[i][i + 1 :], err))
            Q[:, i1:i2], codes[:, i1:i2], errors[:, i1:i2] = Qt.t(), Ct.t(), (Et * Et / 2.0).t()
            W[:rows, i2:] -= Et.t()[:rows].contiguous() @ Hinv[i1:i2, i2:].to(torch.float32)  # padded rows stay 0
        if row_group is not None:
            scales, zeros = rg_scales.repeat_interleave(row_group, 0)[:rows], rg_zeros.repeat_interleave(row_group, 0)[:rows]
            Q, codes, errors = Q[:rows], codes[:rows], errors[:rows]
        del W, Hinv
        if act_order:  # back to the original column order (otherwise it is the order already: no copies)
            inv = torch.argsort(order)
            errors, codes, Q = errors[:, inv], codes[:, inv], Q[:, inv]
        self.last_errors = errors.cpu()
        self.last_error = float(self.last_errors.sum(dtype=torch.float64))
        # uint8 codes (every supported width fits): an int64 copy of a 7B U band's codes would be 0.13 GB
        return codes.to(torch.uint8).cpu(), scales.cpu(), zeros.cpu(), Q.cpu()


def _pack(
    bits: int, group_size: int, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dq: torch.Tensor
) -> QuantizedMatrix:
    if bits == 16:
        return QuantizedMatrix.from_float16(dq)
    return QuantizedMatrix.from_int(codes, scales, zeros, bits, group_size)


def _check_bands(bands: Sequence[tuple[int, int]], total: int, what: str, name: str) -> list[tuple[int, int]]:
    out = [(int(b), int(r)) for b, r in bands]
    for b, r in out:
        if b not in SUPPORTED_BITS:
            raise DeltaCoMeError(f"GPTQ{_where(name)}: unsupported bit width {b}; supported: {SUPPORTED_BITS}")
        if r < 0:
            raise DeltaCoMeError(f"GPTQ{_where(name)}: negative band size {r}")
    if sum(r for _, r in out) != total:
        raise DeltaCoMeError(
            f"GPTQ{_where(name)}: bands {out} cover {sum(r for _, r in out)} {what}, the weight has {total}"
        )
    return out


def _where(name: str) -> str:
    return f" of {name!r}" if name else ""
