"""Verification (the seed's EER / FAR table) and retrieval (IRRA's R@K / mAP / mINP): the one place metrics are
computed and printed. evaluation_labels.py, evaluation_model.py and main.py's periodic eval all call it.

    from metrics import evaluate_embeddings, format_verification_table, format_error_lists, format_retrieval
    res = evaluate_embeddings(img_emb, cap_emb, cap_img_index, img_pids, cap_pids)
    print(format_verification_table(res["verification"]))
    print(format_error_lists(res["verification"], img_names, cap_names))
    print(format_retrieval(res["t2i"], res["i2t"]))
    res["headline"]   # {"eer", "frr@1e-3", ..., "r1", "r5", "r10", "map", "minp", "i2t_r1", ...} for TensorBoard/JSON

Speed and memory: python bench/eval_speed.py --n_img 5000 --n_cap 25000
Tests (brute-force references, ties, several blocks):  python3 -m pytest -q tests/test_metrics.py

Scores are dot products in float32 (cosine: the embeddings are unit norm; pass normalize=True if they are not).
They are computed one tile at a time (`block` = the most scores held at once), never as a dense N x M matrix,
and every figure is exact for those scores -- equal to a sort-everything reference, ties included -- not a
histogram approximation. How (see `verification`): the positives (few) are scored first; then every tile of
negatives is counted into the intervals between consecutive distinct positive scores, which gives the exact FAR
at every positive-score threshold (hence the exact EER and the FRR at each FAR level), while the largest
negatives are kept exactly (a running top-K), which gives the exact FAR thresholds and the false-accept list.
"""
import math
import sys
import time

import numpy as np
import torch

from search.charmap import printable

DEFAULT_FAR_LEVELS = (1e-3, 1e-4, 1e-5, 1e-6, 0.0)
DEFAULT_BLOCK = 1 << 22  # scores held at once (~16 MiB of float32); the per-block work keeps a few copies of it
_CELLS_PER_POSITIVE = 16  # resolution of the counting lookup table (speed only; results are exact at any value)
_MAX_CELLS = 1 << 22
_MAX_PER_CELL = 16  # positives per cell above which the exact path falls back to a binary search
_TILE_ROWS = 256  # rows a score tile keeps when a row alone would fill a block

__all__ = ["verification", "retrieval", "evaluate_embeddings", "format_verification_table", "format_error_lists",
           "format_retrieval", "format_far", "headline", "to_jsonable", "DEFAULT_FAR_LEVELS"]


# ----------------------------------------------------------------------------------------------------------------
# input checking

def _emb(x, name, device=None, normalize=False):
    """2-D float32 torch tensor (a copy when the input is float16 / numpy memmap / read-only)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if device is not None:
            t = t.to(device)
        t = t.to(torch.float32).contiguous()
    else:
        a = np.asarray(x)
        if a.dtype.kind not in "fiu":
            raise ValueError(f"{name}: expected a float array, got dtype {a.dtype}")
        if a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.writeable:
            a = np.array(a, dtype=np.float32, order="C", copy=True)  # float16 memmaps land here
        t = torch.from_numpy(a)
        if device is not None:
            t = t.to(device)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [rows, dim] array, got shape {list(t.shape)}")
    finite = np.isfinite(t.numpy()).all() if t.device.type == "cpu" else bool(torch.isfinite(t).all())
    if not finite:
        raise ValueError(f"{name}: contains NaN or infinite values")
    if normalize:
        t = torch.nn.functional.normalize(t, dim=1)
    return t


def _pair(a, a_name, b, b_name, normalize):
    a = _emb(a, a_name, normalize=normalize)
    b = _emb(b, b_name, device=a.device, normalize=normalize)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} is {a.shape[1]}-d but {b_name} is {b.shape[1]}-d")
    return a, b


def _ints(x, name, n):
    """1-D int64 numpy array of length n (ids and indices are small: they live on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{name}: expected {n} integers, got shape {list(a.shape)}")
    if a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and bool(np.all(a == np.round(a)))):
        raise ValueError(f"{name}: expected integers, got {a.dtype}")
    return a.astype(np.int64)


def _far_levels(levels):
    out = []
    for x in levels:
        x = float(x)
        if not 0.0 <= x < 1.0:
            raise ValueError(f"FAR level {x} is not in [0, 1)")
        out.append(x)
    return out


def _tiles(n_rows, n_cols, block):
    """(rows, cols) of a score tile holding at most `block` scores. Whole rows while a row is short; a long row is
    split into equal column tiles so that a tile still has ~_TILE_ROWS rows: a GEMM of a few rows against a huge
    matrix would re-read that matrix from memory for every few rows."""
    block = int(block)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    target = max(1, block // _TILE_ROWS)
    cols = max(1, n_cols) if n_cols <= target else -(-n_cols // -(-n_cols // target))
    return max(1, block // cols), cols


class _SameId:
    """The (row, col) pairs of a block whose ids are equal, found through the sorted column ids: O(pairs), never
    a B x M mask."""

    def __init__(self, col_pids):
        self.order = np.argsort(col_pids, kind="stable")
        self.sorted = col_pids[self.order]

    def counts(self, row_pids):
        lo = np.searchsorted(self.sorted, row_pids, side="left")
        return lo, np.searchsorted(self.sorted, row_pids, side="right") - lo

    def pairs(self, row_pids):
        """rows, cols (rows ascending, cols in ascending column order within a row), per-row counts."""
        lo, cnt = self.counts(row_pids)
        rows = np.repeat(np.arange(len(row_pids)), cnt)
        first = np.cumsum(cnt) - cnt
        offs = np.arange(len(rows)) - np.repeat(first, cnt)
        cols = self.order[np.repeat(lo, cnt) + offs]
        return rows, cols, cnt


def _scores(a, bT):
    """float32 [B, M] numpy scores of one block: the GEMM in torch (BLAS, any device), the rest in numpy (on a
    2-core machine numpy's single-threaded element-wise passes beat torch's threaded ones several times)."""
    return torch.mm(a, bT).cpu().numpy()


class _Progress:
    """Prints `<name>: 40% (12.3s, ~18.5s left)` to stderr at most every 10% of the rows."""

    def __init__(self, name, total):
        self.name, self.total, self.t0, self.next = name, max(1, total), time.time(), 0.1

    def __call__(self, done):
        f = done / self.total
        if f >= self.next:
            el = time.time() - self.t0
            print(f"{self.name}: {100 * f:.0f}% ({el:.1f}s, ~{el / f - el:.1f}s left)", file=sys.stderr, flush=True)
            self.next = math.floor(f * 10 + 1) / 10


def _next_up(v):
    """The smallest float32 above v: the lowest threshold that rejects a score equal to v."""
    return float(np.nextafter(np.float32(v), np.float32(np.inf)))


def _allowed_false_accepts(x, n_neg):
    """Largest count c with c / n_neg <= x (the same float comparison a reference would make)."""
    c = int(math.floor(x * n_neg))
    while c + 1 <= n_neg and (c + 1) / n_neg <= x:
        c += 1
    while c > 0 and c / n_neg > x:
        c -= 1
    return c


# ----------------------------------------------------------------------------------------------------------------
# verification

def verification(img_emb, cap_emb, cap_img_index, img_pids, cap_pids, far_levels=DEFAULT_FAR_LEVELS, top_k=15,
                 block=DEFAULT_BLOCK, normalize=False, progress=False, _prepared=False):
    """Image-caption verification as the seed prints it. Returns a dict (see the keys at the end).
    progress=True prints `verification: 40% (12.3s, ~18.5s left)` lines to stderr (large sets take minutes).

    Pairs. score(i, j) = <img_emb[i], cap_emb[j]> in float32 (cosine for unit-norm inputs).
      positive: caption j of image i itself (cap_img_index[j] == i); cap_img_index[j] = -1 means caption j's
                image is not among the images (it then only makes negatives);
      negative: image i with caption j of another identity (cap_pids[j] != img_pids[i]);
      the rest (same identity, other image) is neither. Verify Count = n_pos + n_neg.
    Definitions (P = positive scores, N = negative scores):
      FAR(t) = #{n in N : n >= t} / |N|          FRR(t) = #{p in P : p < t} / |P|
      FAR level x > 0: the threshold is the smallest float32 t with FAR(t) <= x, i.e. just above the (k+1)-th
        largest negative, k = the largest count with k / |N| <= x; FRR is FRR(t) there. When k = 0 (x * |N| < 1)
        the negatives cannot resolve x: that level is reported as None ("n/a"), not faked.
      FAR = 0: the threshold is just above the largest negative (the smallest float32 t with FAR(t) = 0).
      EER: over the candidate thresholds t = every distinct positive score (the corners of the ROC staircase
        where a genuine pair flips from accepted to rejected), take t* minimising |FAR(t) - FRR(t)| (compared
        exactly in integers; ties -> the smallest t); EER = (FAR(t*) + FRR(t*)) / 2, threshold t*.
      All rates are returned in percent.
    Error lists: top_k false rejects = the lowest-scoring positives, top_k false accepts = the highest-scoring
      negatives, each as (img_idx, cap_idx, score); ties by (img_idx, cap_idx) ascending.

    How it stays exact in bounded memory. Scores are computed in tiles of at most `block` (rows of images x
    columns of captions, see _tiles) and each pair is scored exactly once, so every figure is exact for those
    float32 scores (a float32 GEMM rounds differently for different tile shapes: another computation of the same
    pair may differ in the last bit). Pass 1 scores the positives (a dot product per caption with its own image).
    Pass 2 scores each tile, masks its same-identity pairs (found through sorted ids, not an N x M mask) and counts
    its negatives into the intervals between consecutive distinct positive scores u_1 < ... < u_m (bucket
    b = #{u <= s}). The bucket comes from a lookup table over a uniform grid: cell(s) = int(clip((s - lo) * scale))
    in float32 is monotone in s (IEEE rounding is monotone), so a score whose cell holds no positive has bucket
    #{u : cell(u) < cell(s)}, exactly; a score in a cell holding positives is compared with those few positives.
    FAR at every u_k is then a suffix sum of the bucket counts. The K largest negatives (K = k + 1 of the loosest
    FAR level) are kept exactly by a buffer filtered by its running K-th value; the false accepts by a running
    top_k of (score, i, j).
    Memory: float32 copies of the inputs + O(block) + O(K) (K = 1e-3 of the negatives with the default levels).
    """
    img, cap = (img_emb, cap_emb) if _prepared else _pair(img_emb, "img_emb", cap_emb, "cap_emb", normalize)
    dev = img.device
    n_img, n_cap = img.shape[0], cap.shape[0]
    ipid = _ints(img_pids, "img_pids", n_img)
    cpid = _ints(cap_pids, "cap_pids", n_cap)
    cii = _ints(cap_img_index, "cap_img_index", n_cap)
    levels = _far_levels(far_levels)
    top_k = int(top_k)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if n_cap and (cii.min() < -1 or cii.max() >= n_img):
        raise ValueError(f"cap_img_index: values must be in [-1, {n_img}) (-1 = caption's image not evaluated)")
    bad = np.flatnonzero((cii >= 0) & (cpid != ipid[np.maximum(cii, 0)]))
    if len(bad):
        j = int(bad[0])
        raise ValueError(f"caption {j} has id {cpid[j]} but its image {cii[j]} has id {ipid[cii[j]]} "
                         f"(arguments in the wrong order?)")
    rows, cols = _tiles(n_img, n_cap, block)

    # ---- pass 1: positive scores, one dot product per caption with its own image
    pos_j = np.flatnonzero(cii >= 0)
    if not len(pos_j):
        raise ValueError("no positive pairs: no caption belongs to one of the images (check cap_img_index)")
    pos_i = cii[pos_j]
    pos_s = np.empty(len(pos_j), np.float32)
    chunk = max(1, int(block) // max(1, img.shape[1]))
    for a in range(0, len(pos_j), chunk):
        ii, jj = (torch.from_numpy(x[a:a + chunk]).to(dev) for x in (pos_i, pos_j))
        pos_s[a:a + chunk] = (img[ii] * cap[jj]).sum(1).cpu().numpy()
    n_pos = len(pos_s)
    u, u_cnt = np.unique(pos_s, return_counts=True)  # u_1 < ... < u_m (float32)
    m = len(u)
    pos_le = np.cumsum(u_cnt)  # #{p <= u_k}

    same = _SameId(cpid)
    n_same = int(same.counts(ipid)[1].sum())
    n_neg = n_img * n_cap - n_same

    # FAR levels: k allowed false accepts each; the K largest negatives are kept exactly, K = max(k) + 1
    ks = [_allowed_false_accepts(x, n_neg) if n_neg else 0 for x in levels]
    K = min(n_neg, max([k + 1 for k, x in zip(ks, levels) if n_neg and (k > 0 or x == 0.0)], default=0))

    # counting table. cell(s) = int(clip((s - lo2) * scale, 0, cmax)) with float32 operations is monotone in s, so
    # a score whose cell holds no positive has bucket #{u <= s} = #{u : cell(u) < cell(s)} exactly.
    lo_u, hi_u = float(u[0]), float(u[-1])
    n_cells = int(min(_MAX_CELLS, max(64, _CELLS_PER_POSITIVE * m)))
    scale = np.float32(min(n_cells / (hi_u - lo_u), 1e30) if hi_u > lo_u else 1.0)
    lo2 = np.float32(lo_u - 2.0 / float(scale))  # u_1 lands near cell 2: cell 0 (below, and -inf) holds no positive

    def cells(x, out):
        np.subtract(x, lo2, out=out)
        np.multiply(out, scale, out=out)
        return out

    pc = cells(u, np.empty_like(u))
    cmax = np.float32(math.floor(float(pc.max())) + 1.0)  # scores above every positive's cell clamp here (empty)
    pcell = np.clip(pc, np.float32(0), cmax).astype(np.int64)
    n_tab = int(cmax) + 1
    first = np.searchsorted(pcell, np.arange(n_tab), side="left").astype(np.int32)  # #{u : cell(u) < c}
    n_in = np.bincount(pcell, minlength=n_tab).astype(np.int32)  # #{u : cell(u) == c}
    max_in = int(n_in.max())
    # lut[c] = the bucket of every score in cell c, or m + 1 ("look closer") when c holds a positive; int32 keeps
    # the table small enough to stay in cache
    lut = first.copy()
    lut[pcell] = m + 1

    counts = np.zeros(m + 2, np.int64)
    n_masked = 0
    neg_min, neg_max = math.inf, -math.inf
    buf, n_buf, tau = [], 0, -np.inf  # the K largest negative values so far (tau: the K-th once known)
    fa = None  # the top_k false accepts so far: (score, i, j) arrays sorted by (-score, i, j)
    tmp = np.empty(rows * cols, np.float32)
    cb = np.empty(rows * cols, np.int64)
    bk = np.empty(rows * cols, np.int32)

    # ---- pass 2: negatives, tile by tile (row blocks of images x column blocks of captions)
    report = _Progress("verification", n_img) if progress else None
    for i0 in range(0, n_img, rows):
        if report:
            report(i0)
        r_blk, c_blk, _ = same.pairs(ipid[i0:i0 + rows])  # same-identity pairs of these rows
        for j0 in range(0, n_cap, cols):
            S = _scores(img[i0:i0 + rows], cap[j0:j0 + cols].t())
            C = S.shape[1]
            flat = S.reshape(-1)
            n = flat.size
            inside = (c_blk >= j0) & (c_blk < j0 + C)
            lin = r_blk[inside] * C + (c_blk[inside] - j0)
            if n == len(lin):
                continue  # nothing but same-identity pairs
            flat[lin] = np.inf
            neg_min = min(neg_min, float(flat.min()))
            flat[lin] = -np.inf  # masked pairs: bucket 0 (subtracted below), never above a threshold
            n_masked += len(lin)
            neg_max = max(neg_max, float(flat.max()))

            t = np.clip(cells(flat, tmp[:n]), np.float32(0), cmax, out=tmp[:n])
            np.copyto(cb[:n], t, casting="unsafe")  # truncation of values >= 0: floor
            b = np.take(lut, cb[:n], out=bk[:n], mode="clip")  # (indices are in range: clip skips the check)
            amb = np.flatnonzero(b == m + 1)
            if len(amb):  # bucket = #{u in lower cells} + #{u in its own cell with u <= s}
                sa = flat[amb]
                if max_in <= _MAX_PER_CELL:
                    ca = cb[amb]
                    fa_, na = first[ca], n_in[ca]
                    bb = fa_.copy()
                    for q in range(max_in):
                        bb += (na > q) & (sa >= u[np.minimum(fa_ + q, m - 1)])
                    b[amb] = bb
                else:  # crowded cells (very uneven positive scores): plain binary search
                    b[amb] = np.searchsorted(u, sa, side="right")
            counts += np.bincount(b, minlength=m + 2)

            if K:  # values above the running K-th largest; compact to K when the buffer doubles
                v = flat[flat > tau]
                if len(v):
                    buf.append(v)
                    n_buf += len(v)
                    if n_buf >= 2 * K or (tau == -np.inf and n_buf >= K):
                        allv = np.concatenate(buf)
                        allv = np.partition(allv, len(allv) - K)[len(allv) - K:]
                        buf, n_buf, tau = [allv], K, allv.min()

            if top_k:  # candidates: everything at or above the current k-th false accept, ties included
                if fa is not None and len(fa[0]) == top_k:
                    sel = np.flatnonzero(flat >= fa[0][-1])
                else:
                    kth = np.partition(flat, n - top_k)[n - top_k] if n - len(lin) > top_k else -np.inf
                    sel = np.flatnonzero(flat >= kth) if kth > -np.inf else np.flatnonzero(flat > -np.inf)
                if len(sel):
                    s_c, i_c, j_c = flat[sel].astype(np.float64), sel // C + i0, sel % C + j0
                    if fa is not None:
                        s_c, i_c, j_c = (np.concatenate([x, y]) for x, y in zip(fa, (s_c, i_c, j_c)))
                    o = np.lexsort((j_c, i_c, -s_c))[:top_k]
                    fa = (s_c[o], i_c[o], j_c[o])

    # ---- assemble
    assert counts[m + 1] == 0
    counts = counts[:m + 1]
    counts[0] -= n_masked
    assert counts.sum() == n_neg and (counts >= 0).all(), "internal error: negative counts do not add up"
    far_ge = np.cumsum(counts[::-1])[::-1][1:]  # far_ge[k] = #{n >= u_k}  (bucket >= k+1)
    frr_lt = pos_le - u_cnt  # #{p < u_k}

    res = dict(n_pos=n_pos, n_neg=n_neg, verify_count=n_pos + n_neg, n_images=n_img, n_captions=n_cap,
               n_same_id_pairs=n_same - n_pos, top_k=top_k)
    res["score_min"] = min(lo_u, neg_min) if n_neg else lo_u
    res["score_max"] = max(hi_u, neg_max) if n_neg else hi_u
    res["pos_score_mean"] = float(pos_s.astype(np.float64).mean())

    if n_neg:
        if n_neg * n_pos < (1 << 62):
            d = np.abs(far_ge * n_pos - frr_lt * n_neg)
        else:  # exact big integers
            d = np.abs(far_ge.astype(object) * n_pos - frr_lt.astype(object) * n_neg)
        k = int(np.argmin(d))
        far_e, frr_e = int(far_ge[k]) / n_neg, int(frr_lt[k]) / n_pos
        res.update(eer=100.0 * (far_e + frr_e) / 2, eer_threshold=float(u[k]), eer_far=100.0 * far_e,
                   eer_frr=100.0 * frr_e)
    else:
        res.update(eer=None, eer_threshold=None, eer_far=None, eer_frr=None)

    top_vals = -np.sort(-np.concatenate(buf))[:K] if K else None  # descending
    lv = []
    for x, kx in zip(levels, ks):
        e = dict(far=x, label=format_far(x), resolvable=bool(n_neg and (kx > 0 or x == 0.0)), allowed=kx)
        if e["resolvable"]:
            v = top_vals[kx]  # the (k+1)-th largest negative
            b = int(np.searchsorted(u, v, side="right"))  # distinct positives <= v
            n_fa = int(np.count_nonzero(top_vals[:kx + 1] > v))
            e.update(frr=100.0 * (int(pos_le[b - 1]) if b else 0) / n_pos, threshold=_next_up(v),
                     far_actual=100.0 * n_fa / n_neg, false_accepts=n_fa)
        else:
            e.update(frr=None, threshold=None, far_actual=None, false_accepts=None)
        lv.append(e)
    res["far_levels"] = lv

    o = np.lexsort((pos_j, pos_i, pos_s))[:top_k]
    res["false_rejects"] = [(int(pos_i[q]), int(pos_j[q]), float(pos_s[q])) for q in o]
    res["false_accepts"] = [] if fa is None else [(int(i), int(j), float(s)) for s, i, j in zip(*fa)]
    return res


# ----------------------------------------------------------------------------------------------------------------
# retrieval

def retrieval(query_emb, query_pids, gallery_emb, gallery_pids, ks=(1, 5, 10), block=DEFAULT_BLOCK,
              normalize=False, progress=False, _prepared=False, _name="retrieval"):
    """Ranking metrics as IRRA's evaluator computes them, in percent. progress=True: see `verification`.

    Each query ranks the whole gallery by score (dot product, float32) descending; equal scores are ordered by
    gallery index ascending (a stable sort), so results are deterministic. A hit is any gallery item with the
    query's pid. Per query with P positives at 1-based ranks r_1 < ... < r_P:
      R@K: 100 if r_1 <= K;  AP = mean_k (k / r_k);  INP = P / r_P  (mINP: the rank of the hardest positive).
    R@K, mAP, mINP are means over queries that have at least one positive; queries without one are excluded
    and counted (n_excluded). Used both ways: text->image (queries = captions) and image->text.

    Tile by tile (at most `block` scores at once), no full sort: the (query, positive) pairs are scored first
    (a dot product each; the tiles use these scores for them, so every pair has one score); then only gallery
    items scoring at least the row's worst positive can precede a positive, so just those are ranked, by exact
    integer keys (row, score descending, gallery index) and a binary search among the row's positives' keys:
    rank(k-th positive) = #{items with fewer than k positives before them}.
    """
    q, g = (query_emb, gallery_emb) if _prepared else \
        _pair(query_emb, "query_emb", gallery_emb, "gallery_emb", normalize)
    dev = q.device
    n_q, n_g = q.shape[0], g.shape[0]
    qp = _ints(query_pids, "query_pids", n_q)
    gp = _ints(gallery_pids, "gallery_pids", n_g)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")
    rows, cols = _tiles(n_q, n_g, block)
    rows = min(rows, max(1, (1 << 30) // max(1, n_g)))  # keys: row bits + index bits <= 31
    gbits = max(1, int(n_g - 1).bit_length())

    def keys(rr, cc, vals):  # ascending = (row asc, score desc, gallery index asc), exact integers < 2^63
        bits = (vals + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 = +0.0: the two zeros tie
        desc = np.where(bits < 0x80000000, bits ^ np.uint32(0x7FFFFFFF), bits).astype(np.int64)
        return (rr.astype(np.int64) << (32 + gbits)) | (desc << gbits) | cc.astype(np.int64)

    # every (query, positive) pair, scored once by a dot product; the tiles take these scores for those pairs
    same = _SameId(gp)
    pr, pc, npos_all = same.pairs(qp)
    ps = np.empty(len(pr), np.float32)
    chunk = max(1, int(block) // max(1, q.shape[1]))
    for a in range(0, len(pr), chunk):
        ii, jj = (torch.from_numpy(x[a:a + chunk]).to(dev) for x in (pr, pc))
        ps[a:a + chunk] = (q[ii] * g[jj]).sum(1).cpu().numpy()
    first_pair = np.concatenate([[0], np.cumsum(npos_all)])

    hits = np.zeros(len(ks), np.int64)
    ap_sum = inp_sum = 0.0
    n_valid = 0
    report = _Progress(_name, n_q) if progress else None
    for q0 in range(0, n_q, rows):
        if report:
            report(q0)
        q1 = min(n_q, q0 + rows)
        npos = npos_all[q0:q1]
        if not npos.any():
            continue
        B, p_max = q1 - q0, int(npos.max())
        sl = slice(first_pair[q0], first_pair[q1])
        r, c, v = pr[sl] - q0, pc[sl], ps[sl]
        worst = np.full(B, np.inf, np.float32)
        np.minimum.at(worst, r, v)
        pk = np.sort(keys(r, c, v))
        before = np.cumsum(npos) - npos  # positives of earlier rows (pk is sorted by row first)
        cnt = np.zeros(B * (p_max + 1), np.int64)
        for j0 in range(0, n_g, cols):
            S = _scores(q[q0:q1], g[j0:j0 + cols].t())
            C = S.shape[1]
            inside = (c >= j0) & (c < j0 + C)
            S[r[inside], c[inside] - j0] = v[inside]  # the positives' own scores
            # only items scoring at least the row's worst positive can precede a positive
            sel = np.flatnonzero(S >= worst[:, None])
            sr, sc = np.divmod(sel, C)
            nb = np.searchsorted(pk, keys(sr, sc + j0, S.reshape(-1)[sel]), side="left") - before[sr]
            cnt += np.bincount(sr * (p_max + 1) + nb, minlength=B * (p_max + 1))
        # rank of the k-th positive (1-based) = #{items with fewer than k positives before them}
        ranks = np.cumsum(cnt.reshape(B, p_max + 1), axis=1)[:, :p_max].astype(np.float64)
        valid = npos > 0
        kk = np.arange(1, p_max + 1, dtype=np.float64)
        inside = kk[None, :] <= npos[:, None]
        ap = np.where(inside, kk[None, :] / np.maximum(ranks, 1), 0.0).sum(1)[valid] / npos[valid]
        inp = npos[valid] / ranks[valid, npos[valid] - 1]
        r1 = ranks[valid, 0]
        hits += [int((r1 <= k).sum()) for k in ks]
        ap_sum += float(ap.sum())
        inp_sum += float(inp.sum())
        n_valid += int(valid.sum())
    res = dict(n_queries=n_valid, n_excluded=n_q - n_valid, n_gallery=n_g, ks=ks)
    if n_valid == 0:
        res.update({f"R@{k}": None for k in ks}, mAP=None, mINP=None)
    else:
        res.update({f"R@{k}": 100.0 * int(hits[t]) / n_valid for t, k in enumerate(ks)},
                   mAP=100.0 * ap_sum / n_valid, mINP=100.0 * inp_sum / n_valid)
    return res


# ----------------------------------------------------------------------------------------------------------------
# both, and the headline numbers

def evaluate_embeddings(img_emb, cap_emb, cap_img_index, img_pids, cap_pids, far_levels=DEFAULT_FAR_LEVELS,
                        top_k=15, ks=(1, 5, 10), block=DEFAULT_BLOCK, normalize=False, progress=False):
    """verification + text->image and image->text retrieval on the same embeddings.
    Returns {"verification": ..., "t2i": ..., "i2t": ..., "headline": flat dict (see `headline`)}."""
    img, cap = _pair(img_emb, "img_emb", cap_emb, "cap_emb", normalize)  # convert and check once for all three
    v = verification(img, cap, cap_img_index, img_pids, cap_pids, far_levels=far_levels, top_k=top_k, block=block,
                     progress=progress, _prepared=True)
    t2i = retrieval(cap, cap_pids, img, img_pids, ks=ks, block=block, progress=progress, _prepared=True,
                    _name="retrieval t2i")
    i2t = retrieval(img, img_pids, cap, cap_pids, ks=ks, block=block, progress=progress, _prepared=True,
                    _name="retrieval i2t")
    out = dict(verification=v, t2i=t2i, i2t=i2t)
    out["headline"] = headline(out)
    return out


def headline(res):
    """Flat {name: float|None}: eer, frr@<level> per FAR level, r1/r5/r10/map/minp (text->image), i2t_* likewise."""
    h = {}
    v = res.get("verification")
    if v is not None:
        h["eer"] = v["eer"]
        for e in v["far_levels"]:
            h[f"frr@{e['label']}"] = e["frr"]
    for pre, key in (("", "t2i"), ("i2t_", "i2t")):
        r = res.get(key)
        if r is None:
            continue
        for k in r["ks"]:
            h[f"{pre}r{k}"] = r[f"R@{k}"]
        h[f"{pre}map"], h[f"{pre}minp"] = r["mAP"], r["mINP"]
    return h


def to_jsonable(obj):
    """Plain JSON types (tuples -> lists, numpy scalars -> Python, non-finite floats -> None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    return obj


# ----------------------------------------------------------------------------------------------------------------
# printing

def format_far(x):
    """1e-3 -> '1e-3', 0 -> '0', 0.015 -> '1.5e-2' (the seed's column labels)."""
    if x == 0:
        return "0"
    mant, exp = f"{x:e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def format_verification_table(result):
    """The seed's table:
            EER      FAR=1e-3  FAR=1e-4  FAR=1e-5  FAR=1e-6  FAR=0
    ----------------------------------------------------------------
    FRR    12.2132%  90.5400%  98.5000%  99.9200%  100.0000%  100.0000%
    SCORE   0.0641772 0.153719  0.180852  0.201203  0.213413  0.217483
    Verify Count=12466498. Score in [ -0.21 - 0.74 ]
    A FAR level the negatives cannot resolve (FAR * n_neg < 1) prints n/a."""
    head = " " * 8 + "EER" + " " * 6 + "  ".join(f"FAR={e['label']:<4}" for e in result["far_levels"])
    cells = [(result["eer"], result["eer_threshold"])] + [(e["frr"], e["threshold"]) for e in result["far_levels"]]
    frr = "FRR    " + "".join(("n/a" if f is None else f"{f:.4f}%").ljust(8) + "  " for f, _ in cells)
    score = "SCORE   " + "".join(("n/a" if t is None else f"{t:g}").ljust(9) + " " for _, t in cells)
    tail = (f"Verify Count={result['verify_count']}. "
            f"Score in [ {result['score_min']:.2f} - {result['score_max']:.2f} ]")
    return "\n".join([head.rstrip(), "-" * 64, frr.rstrip(), score.rstrip(), tail])


def format_error_lists(result, img_names, cap_names, k=None):
    """`Top-15 False Rejected:` / `Top-15 False Accepted:` then one `\\t <img_name> <cap_name> <score>` line each."""
    k = result.get("top_k", 15) if k is None else int(k)
    lines = []
    for title, key in (("False Rejected", "false_rejects"), ("False Accepted", "false_accepts")):
        lines.append(f"Top-{k} {title}:")
        for i, j, s in result[key][:k]:
            lines.append(f"\t {printable(img_names[i])} {printable(cap_names[j])} {s!r}")  # names come from files
    return "\n".join(lines)


def format_retrieval(result_t2i, result_i2t=None):
    """A small table, one line per direction:
           R@1     R@5     R@10    mAP     mINP    queries
    t2i    45.12   70.01   80.33   40.20   20.10   25000"""
    ks = result_t2i["ks"]
    cols = [f"R@{k}" for k in ks] + ["mAP", "mINP"]
    lines = [" " * 7 + "".join(f"{c:<8}" for c in cols) + "queries"]
    for name, r in (("t2i", result_t2i), ("i2t", result_i2t)):
        if r is None:
            continue
        vals = "".join(("n/a" if r[c] is None else f"{r[c]:.2f}").ljust(8) for c in cols)
        extra = f" ({r['n_excluded']} without a match excluded)" if r["n_excluded"] else ""
        lines.append(f"{name:<7}{vals}{r['n_queries']}{extra}")
    return "\n".join(lines)
