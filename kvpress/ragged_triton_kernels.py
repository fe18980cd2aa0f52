# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The two Triton kernels of the `"triton"` ragged backend, as plain functions: `kvpress.ragged_triton` applies
`triton.jit` to them at first use (so that `TRITON_INTERPRET` is read then) and explains the algorithm. They live at
module level because Triton's interpreter swaps the `tl` of a kernel's module globals. Importing this module needs
Triton."""

import triton.language as tl


def partial_kernel(
    Q,
    K,
    V,
    POS,
    VIS,
    OFF,
    LEN,
    LOGICAL,
    ACC,
    LSE,
    scale,
    softcap,
    stride_qs,
    stride_qr,
    stride_k,
    stride_v,
    stride_as,
    stride_ap,
    stride_ar,
    stride_ls,
    stride_lp,
    ROWS: tl.constexpr,
    ROWS_PAD: tl.constexpr,
    Q_LEN: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
):
    seg = tl.program_id(0)
    part = tl.program_id(1)
    start = tl.load(OFF + seg).to(tl.int64)
    length = tl.load(LEN + seg)
    lo = part * CHUNK
    hi = tl.minimum(lo + CHUNK, length)
    r = tl.arange(0, ROWS_PAD)
    d = tl.arange(0, D_PAD)
    row_ok = r < ROWS
    d_ok = d < D
    q = tl.load(
        Q + seg * stride_qs + r[:, None] * stride_qr + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )
    query_pos = tl.load(LOGICAL) - Q_LEN + r % Q_LEN
    m = tl.full([ROWS_PAD], float("-inf"), tl.float32)
    total = tl.full([ROWS_PAD], 0.0, tl.float32)
    acc = tl.full([ROWS_PAD, D_PAD], 0.0, tl.float32)
    # a fixed trip count (the rows past `hi` are masked, their loads read nothing); a compile-time one, since
    # Triton's interpreter cannot take a runtime loop bound under numpy 2
    for n0 in range(0, CHUNK, BLOCK):
        n = lo + n0 + tl.arange(0, BLOCK)
        in_range = n < hi
        row = start + n
        k = tl.load(K + row[:, None] * stride_k + d[None, :], mask=in_range[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
        s = s * 1.4426950408889634  # exp2 from here on
        pos = tl.load(POS + row, mask=in_range, other=0)
        vis = tl.load(VIS + row, mask=in_range, other=0) != 0
        ok = (in_range & vis)[None, :] & (pos[None, :] <= query_pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(V + row[:, None] * stride_v + d[None, :], mask=in_range[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
    # a program past its segment's end stores nothing (the mask as a block: Triton's interpreter refuses a scalar one)
    active = (lo + r * 0) < length
    tl.store(
        ACC + seg * stride_as + part * stride_ap + r[:, None] * stride_ar + d[None, :],
        out,
        mask=(active & row_ok)[:, None] & d_ok[None, :],
    )
    tl.store(LSE + seg * stride_ls + part * stride_lp + r, lse, mask=active & row_ok)


def combine_kernel(
    ACC,
    LSE,
    LEN,
    OUT,
    stride_as,
    stride_ap,
    stride_ar,
    stride_ls,
    stride_lp,
    kv_heads,
    groups,
    stride_ob,
    stride_oq,
    stride_oh,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    Q_LEN: tl.constexpr,
    PARTS_PAD: tl.constexpr,
    PARTS_BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    seg = tl.program_id(0)
    r = tl.program_id(1)
    length = tl.load(LEN + seg)
    parts = (length + CHUNK - 1) // CHUNK
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    # PARTS_BLOCK partials at a time, in two passes: the largest log-sum-exp, then the weighted sum
    tops = tl.full([PARTS_BLOCK], float("-inf"), tl.float32)
    for p0 in range(0, PARTS_PAD, PARTS_BLOCK):
        p = p0 + tl.arange(0, PARTS_BLOCK)
        lse = tl.load(LSE + seg * stride_ls + p * stride_lp + r, mask=p < parts, other=float("-inf"))
        tops = tl.maximum(tops, lse)
    top = tl.max(tops, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    sums = tl.full([PARTS_BLOCK, D_PAD], 0.0, tl.float32)
    norms = tl.full([PARTS_BLOCK], 0.0, tl.float32)
    for p0 in range(0, PARTS_PAD, PARTS_BLOCK):
        p = p0 + tl.arange(0, PARTS_BLOCK)
        valid = p < parts
        lse = tl.load(LSE + seg * stride_ls + p * stride_lp + r, mask=valid, other=float("-inf"))
        weight = tl.where(valid, tl.exp2(lse - top), 0.0)
        partial = tl.load(
            ACC + seg * stride_as + p[:, None] * stride_ap + r * stride_ar + d[None, :],
            mask=valid[:, None] & d_ok[None, :],
            other=0.0,
        )
        sums += partial * weight[:, None]
        norms += weight
    norm = tl.sum(norms, 0)
    out = tl.sum(sums, 0) / tl.where(norm > 0, norm, 1.0)
    # straight into the attention output's (batch, query, head, dim) layout: segment (b, kv head), row (member, query)
    head = (seg % kv_heads) * groups + r // Q_LEN
    target = OUT + (seg // kv_heads) * stride_ob + (r % Q_LEN) * stride_oq + head * stride_oh + d
    tl.store(target, out.to(OUT.dtype.element_ty), mask=d_ok)
