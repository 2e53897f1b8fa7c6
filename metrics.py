"""Verification (the seed's EER / FAR table) and retrieval (IRRA's R@K / mAP / mINP): the one place metrics are
computed and printed. evaluation_labels.py, evaluation_model.py and main.py's periodic eval all call it.

    from metrics import evaluate_embeddings, format_verification_table, format_error_lists, format_retrieval
    res = evaluate_embeddings(img_emb, cap_emb, cap_img_index, img_pids, cap_pids, progress=True)
    print(format_verification_table(res["verification"]))
    print(format_error_lists(res["verification"], img_names, cap_names))
    print(format_retrieval(res["t2i"], res["i2t"]))
    res["headline"]   # {"eer", "frr@1e-3", ..., "r1", "r5", "r10", "map", "minp", "i2t_r1", ...} for TensorBoard/JSON
    curve = verification_curve(res["verification"])   # ROC / DET points (FAR, FRR per threshold) for plots

Speed and memory (50,000 images x 250,000 captions, all three in one pass):  python bench/eval_speed.py
Tests (brute-force references, ties, duplicate rows, several blocks):  python3 -m pytest -q tests/test_metrics.py

Scores are dot products of float32 embeddings, accumulated in float32 (cosine: the embeddings are unit norm; pass
normalize=True if they are not). precision="bf16" rounds the embeddings to bfloat16 first (8 significant bits)
and lets the CPU's bf16 matrix units (AMX) compute the same float32 sums 2-3x faster; every figure is then exact
for those scores ("auto": bf16 from AUTO_BF16_PAIRS pairs on, where the CPU supports it). The whole score matrix is never held: it is computed one tile at a time (`block` = the
most scores held at once) and EVERY score -- positive or negative, for verification and both retrieval
directions -- comes from that one tile computation, so each pair has exactly one score and identical gallery rows
tie exactly (the lower gallery index wins). Every figure is exact for those scores -- equal to a sort-everything
reference, ties included -- not a histogram approximation. How (see `_score_pass`):

  * rows and columns are grouped by identity (identities in a seeded random order), so an identity's pairs form
    contiguous blocks near the "diagonal"; those band tiles are scored first (a few % of the pairs) and give every
    positive score (the same-identity pairs) and a fair sample of negatives;
  * then every tile is scored once and a compiled kernel (numba) walks it: each negative is counted into the
    intervals between consecutive distinct positive scores (exact FAR at every positive-score threshold: the
    exact EER, FRR at each FAR level, the ROC/DET curve); for retrieval, a gallery item is counted only against
    the query's positives it beats (binary search in the query's sorted positives), so the rank of every positive
    -- hence R@K, AP and INP -- is exact without sorting anything else;
  * the FAR-level thresholds need the (k+1)-th largest negative: the band sample predicts a narrow window around
    it for each level, the pass keeps only negatives inside the windows (bounded memory) plus exact counts above
    them, and if a window missed (counts prove it) a verification-only pass with an exact window repeats it.
"""
import contextlib
import math
import os
import sys
import time

import numpy as np
import torch

from search.charmap import printable

try:  # the per-score work is a compiled loop; numpy would need ~15 passes over every score
    import numba
    from numba import njit, prange

    # numba's own thread pool, not a second OpenMP runtime: two OpenMP pools (torch's GEMM, numba's kernels)
    # spinning against each other on 2 cores made the pass 5x slower (set NUMBA_THREADING_LAYER to override)
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
except ImportError:  # pragma: no cover - requirements.txt installs numba
    numba = None

    def njit(*a, **k):
        return lambda f: f

    prange = range

DEFAULT_FAR_LEVELS = (1e-3, 1e-4, 1e-5, 1e-6, 0.0)
DEFAULT_BLOCK = 1 << 22  # scores held at once (16 MiB of float32)
PRECISIONS = ("auto", "fp32", "bf16")
AUTO_BF16_PAIRS = 1 << 30  # precision="auto": bf16 from this many pairs on (fp32 would take minutes), if supported
_HIST_BINS = 1 << 14  # coarse histogram of the negatives: exact FAR at its cell edges (ROC curve, fallbacks)
_PCAP = 32  # a query with more positives than this counts items by binary search instead of one comparison each
_TILE_ROWS = 1024  # rows a score tile keeps when a row alone would fill a block
_SAMPLE_BINS = 1 << 20  # band-sample histogram over the top 20 bits of the (order-preserving) float32 pattern
_MAX_WINDOW = 1 << 24  # negatives kept in the FAR-level windows at most (64 MiB); more: the fallback pass
_FA_CAP = 4096  # false-accept candidates per thread and tile before the tile is re-scanned exactly
_ID_ORDER_SEED = 0

__all__ = ["verification", "retrieval", "evaluate_embeddings", "verification_curve", "sample_gallery",
           "pick_precision", "format_verification_table", "format_error_lists", "format_retrieval", "format_far", "headline",
           "to_jsonable", "DEFAULT_FAR_LEVELS", "PRECISIONS"]


# ----------------------------------------------------------------------------------------------------------------
# input checking

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


def _rows_of(x, name):
    """(n, dim, take(idx) -> float32 torch rows) without converting the whole input (float16 memmaps stay mapped)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D [rows, dim] array, got shape {list(t.shape)}")
        if not (t.is_floating_point()):
            raise ValueError(f"{name}: expected a float array, got dtype {t.dtype}")
        return t.shape[0], t.shape[1], lambda idx: t[torch.from_numpy(idx).to(t.device)].cpu().float()
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [rows, dim] array, got shape {list(a.shape)}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected a float array, got dtype {a.dtype}")
    return a.shape[0], a.shape[1], lambda idx: torch.from_numpy(np.asarray(a[idx], dtype=np.float32))


def _prepare(x, name, order, n_pad, normalize, precision, chunk=1 << 16):
    """The rows of x in `order`, float32 (bf16-rounded for precision="bf16"), zero-padded to n_pad rows."""
    n, d, take = _rows_of(x, name)
    out = torch.zeros(n_pad, d, dtype=torch.float32)
    for a in range(0, n, chunk):
        blk = take(order[a:a + chunk])
        if not bool(torch.isfinite(blk).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
        if normalize:
            blk = torch.nn.functional.normalize(blk, dim=1)
        if precision == "bf16":
            blk = blk.bfloat16().float()  # exact in the matrix units' input type: the sums are plain float32
        out[a:a + len(blk)] = blk
    return out


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
    if cols > 64 and cols * 64 <= block:  # multiples of 64: the bf16 matrix units ran 1.7x slower at 1039 x 4033
        cols = -(-cols // 64) * 64
    rows = max(1, min(max(1, n_rows), block // cols))
    if rows > 64:
        rows = rows // 64 * 64
    return rows, cols


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


def _bin_floor(b):
    """Smallest float32 in sample-histogram bin b (bins of the order-preserving int32 view, see _band_kernel)."""
    mono = np.int64(b - _SAMPLE_BINS // 2) << 12
    bits = mono if mono >= 0 else mono ^ 0x7FFFFFFF
    v = float(np.array([bits], np.int64).astype(np.int32).view(np.float32)[0])
    return -math.inf if math.isnan(v) else v


@contextlib.contextmanager
def _matmul_precision(precision):
    """precision="bf16": float32 GEMMs run on the bf16 matrix units (oneDNN fpmath mode), float32 out."""
    if precision == "fp32":
        yield
        return
    mm = torch.backends.mkldnn.matmul
    old = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = old


def pick_precision(precision, n_pairs):
    """"auto" -> "bf16" for at least AUTO_BF16_PAIRS pairs on a CPU with bf16 matrix support, else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return "bf16" if bf16 and n_pairs >= AUTO_BF16_PAIRS else "fp32"


def sample_gallery(pids, max_images=0, max_ids=0, seed=0):
    """Sorted positions of a seeded sample of a gallery given its ids: first at most `max_ids` identities (all
    their items), then at most `max_images` items of those. 0 = no limit. The same (pids, limits, seed) give the
    same sample on every machine (numpy's PCG64)."""
    if min(max_images, max_ids) < 0:
        raise ValueError(f"max_images and max_ids must be >= 0, got {max_images} and {max_ids}")
    pids = np.asarray(pids)
    keep = np.arange(len(pids))
    rng = np.random.default_rng(seed)
    if max_ids and max_ids < len(np.unique(pids)):
        ids = rng.choice(np.unique(pids), size=int(max_ids), replace=False)
        keep = keep[np.isin(pids, ids)]
    if max_images and max_images < len(keep):
        keep = np.sort(rng.choice(keep, size=int(max_images), replace=False))
    return keep


# ----------------------------------------------------------------------------------------------------------------
# the compiled per-score kernels (numba). Rows and columns are in identity order; clo[r]:chi[r] are the columns of
# row r's identity (its same-identity pairs), which every kernel skips as negatives.

@njit(cache=True, nogil=True, parallel=True)
def _band_kernel(S, Sb, i0, j0, nr, nc, clo, chi, roff, ps, hist, want_hist):
    """Copy the same-identity scores of a tile into ps (row-major pair order); histogram its other scores by the
    top 20 bits of the order-preserving int32 view of their float32 (the negatives' sample)."""
    T = hist.shape[0]
    step = (nr + T - 1) // T
    for t in prange(T):
        for r in range(t * step, min(nr, (t + 1) * step)):
            gr = i0 + r
            lo = clo[gr] - j0
            hi = chi[gr] - j0
            base = roff[gr] - lo
            for c in range(max(lo, 0), min(hi, nc)):
                ps[base + c] = S[r, c]
            if want_hist:
                for c in range(nc):
                    if c >= lo and c < hi:
                        continue
                    v = np.int64(Sb[r, c])
                    mono = v ^ ((v >> 31) & 0x7FFFFFFF)
                    hist[t, (mono >> 12) + 524288] += 1  # _SAMPLE_BINS // 2 (2^20 bins of 2^12 codes)


@njit(cache=True, nogil=True, inline="always")
def _beats(s, i, ts, ti):
    """Gallery item (score s, index i) ranks before (ts, ti): higher score, or equal score and lower index."""
    return s > ts or (s == ts and i < ti)


@njit(cache=True, nogil=True, inline="always")
def _n_ahead(thr_s, thr_i, o, p, s, i):
    """#{k < p : (thr_s, thr_i)[o + k] ranks before (s, i)} for a list sorted best-first whose last entry (s, i)
    beats: a binary search in [0, p - 1]."""
    lo = 0
    hi = p - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if _beats(thr_s[o + mid], thr_i[o + mid], s, i):
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True, parallel=True)
def _ver_kernel(S, i0, j0, nr, nc, clo, chi, T, hlo, hsc, hmax, hist, negmm,
                ua, ub, ur, ecnt, eab, rare, edges, inwin, icnt, wbuf, wn, fa_thr, fa_s, fa_r, fa_c, fa_n):
    """Verification of one tile. Per negative (a pair of two identities): the score range; a coarse histogram
    (cell(s) = int(clip((s - hlo) * hsc, 0, hmax)) in float32: exact counts at its cell edges, the ROC curve);
    the count above the EER region [ua, ub); and for the few scores inside that region or >= `rare`: their
    bucket = #{region positives ur <= s} (exact counts between consecutive positive scores), the FAR windows
    (the interval between consecutive window edges, values inside a window kept) and the false-accept candidates
    (>= fa_thr).
    Threads own row ranges; everything is accumulated per thread (index t)."""
    step = (nr + T - 1) // T
    E = edges.shape[0]
    wmin = edges[0]
    cap = wbuf.shape[1]
    fcap = fa_s.shape[1]
    n_ur = ur.shape[0]
    for t in prange(T):
        mn = negmm[t, 0]
        mx = negmm[t, 1]
        above = 0
        h = hist[t]
        for r in range(t * step, min(nr, (t + 1) * step)):
            gr = i0 + r
            lo = clo[gr] - j0
            hi = chi[gr] - j0
            row = S[r]
            for c in range(nc):
                if c >= lo and c < hi:
                    continue
                s = row[c]
                mn = min(mn, s)
                mx = max(mx, s)
                x = min(max((s - hlo) * hsc, np.float32(0)), hmax)
                h[np.int64(x)] += 1
                above += s >= ub
                region = (s >= ua) & (s < ub)
                if region | (s >= rare):
                    if region:
                        a = 0
                        b = n_ur
                        while a < b:
                            mid = (a + b) >> 1
                            if ur[mid] <= s:
                                a = mid + 1
                            else:
                                b = mid
                        ecnt[t, a] += 1
                    if s >= wmin:
                        e = 1
                        while e < E and edges[e] <= s:
                            e += 1
                        icnt[t, e] += 1
                        if inwin[e]:
                            k = wn[t]
                            if k < cap:
                                wbuf[t, k] = s
                            wn[t] = k + 1
                    if s >= fa_thr:
                        k = fa_n[t]
                        if k < fcap:
                            fa_s[t, k] = s
                            fa_r[t, k] = gr
                            fa_c[t, k] = j0 + c
                        fa_n[t] = k + 1
        negmm[t, 0] = mn
        negmm[t, 1] = mx
        eab[t] += above


@njit(cache=True, nogil=True, parallel=True)
def _row_kernel(S, i0, j0, nr, nc, T, p_row, roff, thr_s, thr_i, thr_c, beat, big, clo, chi, borig, pcap, buf):
    """Rows are queries. For a row's k-th positive (thr_*[roff + k], best first) beat += #{items of this tile that
    rank before it}, counted by two vectorised comparisons per item (> and ==); equal scores, rare, are then
    resolved by gallery index. A row with more than pcap positives instead counts each non-positive item once
    at #{positives ahead of it} (big; a binary search), for items that beat its worst positive."""
    step = (nr + T - 1) // T
    for t in prange(T):
        for r in range(t * step, min(nr, (t + 1) * step)):
            gr = i0 + r
            p = p_row[gr]
            if p == 0:
                continue
            o = roff[gr]
            row = S[r, :nc]
            if p <= pcap:
                # only items >= the worst positive can rank before a positive: compact them first (branch-free)
                rw = thr_s[o + p - 1]
                cand = buf[t]
                n = 0
                for c in range(nc):
                    v = row[c]
                    cand[n] = v
                    n += v >= rw
                for k in range(p - 1, -1, -1):  # worst to best: the list of candidates only shrinks
                    tv = thr_s[o + k]
                    if (p - 1 - k) % 4 == 3:  # keep only what can still rank before this and better positives
                        w = 0
                        for q in range(n):
                            v = cand[q]
                            cand[w] = v
                            w += v >= tv
                        n = w
                    g = 0
                    e = 0
                    for q in range(n):
                        v = cand[q]
                        g += v > tv
                        e += v == tv
                    sc = thr_c[o + k] - j0
                    if e > (1 if (sc >= 0 and sc < nc) else 0):  # ties besides the positive itself
                        ti = thr_i[o + k]
                        for c in range(nc):
                            if row[c] == tv and borig[j0 + c] < ti:
                                g += 1
                    beat[o + k] += g
            else:
                lo = clo[gr] - j0
                hi = chi[gr] - j0
                rw = thr_s[o + p - 1]
                rwi = thr_i[o + p - 1]
                for c in range(nc):
                    if c >= lo and c < hi:
                        continue
                    s = row[c]
                    ib = borig[j0 + c]
                    if _beats(s, ib, rw, rwi):
                        big[o + _n_ahead(thr_s, thr_i, o, p, s, ib)] += 1


@njit(cache=True, nogil=True, parallel=True)
def _col_kernel(S, i0, j0, nr, nc, T, pm, dthr, gt, eq):
    """Columns are queries: per thread, gt[t, k, c] / eq[t, k, c] += #{rows with score > / == the column's k-th
    positive score dthr[k, j0 + c]} (vectorised along the row)."""
    step = (nr + T - 1) // T
    for t in prange(T):
        gt[t, :pm, :nc] = 0
        eq[t, :pm, :nc] = 0
        for r in range(t * step, min(nr, (t + 1) * step)):
            row = S[r, :nc]
            for k in range(pm):
                tk = dthr[k, j0:j0 + nc]
                g = gt[t, k, :nc]
                e = eq[t, k, :nc]
                for c in range(nc):
                    v = row[c]
                    tv = tk[c]
                    g[c] += v > tv
                    e[c] += v == tv


@njit(cache=True, nogil=True)
def _col_merge(S, i0, j0, nr, nc, pm, dthr, dthr_i, dthr_r, gt, eq, aorig, beat):
    """Sum the threads' column counts into beat[k, c]; resolve equal scores (besides the positive itself) by
    image index."""
    T = gt.shape[0]
    for k in range(pm):
        for c in range(nc):
            g = 0
            e = 0
            for t in range(T):
                g += gt[t, k, c]
                e += eq[t, k, c]
            if e:
                sr = dthr_r[k, j0 + c] - i0
                if e > (1 if (sr >= 0 and sr < nr) else 0):
                    tv = dthr[k, j0 + c]
                    ti = dthr_i[k, j0 + c]
                    for r in range(nr):
                        if S[r, c] == tv and aorig[i0 + r] < ti:
                            g += 1
            beat[k, j0 + c] += g


@njit(cache=True, nogil=True)
def _col_big_kernel(S, i0, j0, nr, cols, rlo, rhi, cnum, coff, thr_s, thr_i, aorig, big):
    """Columns with more than pcap positives (few): each non-positive row counted at #{positives ahead}."""
    for q in range(cols.shape[0]):
        gc = cols[q]
        c = gc - j0
        p = cnum[gc]
        o = coff[gc]
        cw = thr_s[o + p - 1]
        cwi = thr_i[o + p - 1]
        for r in range(nr):
            gr = i0 + r
            if gr >= rlo[gc] and gr < rhi[gc]:
                continue
            s = S[r, c]
            ia = aorig[gr]
            if _beats(s, ia, cw, cwi):
                big[o + _n_ahead(thr_s, thr_i, o, p, s, ia)] += 1


@njit(cache=True, nogil=True)
def _collect_kernel(S, i0, j0, nr, nc, clo, chi, lo_v, hi_v, out_s, out_r, out_c, n0):
    """Negatives of a tile with lo_v <= s < hi_v, appended at out[n0:] (the caller sized out exactly)."""
    n = n0
    for r in range(nr):
        gr = i0 + r
        lo = clo[gr] - j0
        hi = chi[gr] - j0
        for c in range(nc):
            if c >= lo and c < hi:
                continue
            s = S[r, c]
            if s >= lo_v and s < hi_v:
                if n < out_s.shape[0]:  # the caller checks the count afterwards
                    out_s[n] = s
                    out_r[n] = gr
                    out_c[n] = j0 + c
                n += 1
    return n


def _num_threads():
    t = max(1, torch.get_num_threads())
    if numba is not None:
        t = min(t, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(t)
    return t


# ----------------------------------------------------------------------------------------------------------------
# the one pass

def _id_order(a_pids, b_pids, seed=_ID_ORDER_SEED):
    """Row and column orders that group identities, the identities themselves in a seeded random order (so the
    band tiles' negatives are a fair sample of all negatives, not neighbouring ids of one source), items of an
    identity in their original order."""
    uniq = np.unique(np.concatenate([a_pids, b_pids]))
    rank = np.random.default_rng(seed).permutation(len(uniq))
    ka, kb = rank[np.searchsorted(uniq, a_pids)], rank[np.searchsorted(uniq, b_pids)]
    oa, ob = np.argsort(ka, kind="stable"), np.argsort(kb, kind="stable")
    return oa, ob, ka[oa], kb[ob]


class _Tiles:
    """Fixed-shape GEMM tiles of the identity-ordered, zero-padded embeddings: every tile is the same call shape,
    so a pair scored twice (band pre-pass, main pass, a fallback pass) gets the same bits."""

    def __init__(self, A, B, R, C, nA, nB, precision):
        self.A, self.B, self.R, self.C, self.nA, self.nB, self.precision = A, B, R, C, nA, nB, precision
        self.out = torch.empty(R, C, dtype=torch.float32)
        self.np = self.out.numpy()
        self.bits = self.np.view(np.int32)
        self.gemm_s, self.n_scored = 0.0, 0

    def score(self, i0, j0):
        t0 = time.perf_counter()
        with _matmul_precision(self.precision):
            torch.mm(self.A[i0:i0 + self.R], self.B[j0:j0 + self.C].t(), out=self.out)
        self.gemm_s += time.perf_counter() - t0
        self.n_scored += 1
        return min(self.R, self.nA - i0), min(self.C, self.nB - j0)

    def all(self):
        return [(i0, j0) for i0 in range(0, self.nA, self.R) for j0 in range(0, self.nB, self.C)]


def _sorted_pairs(key_first, score, key_idx):
    """lexsort: by key_first, then score descending, then key_idx ascending."""
    return np.lexsort((key_idx, -score, key_first))


def _score_pass(a_emb, a_pids, b_emb, b_pids, *, cap_img_index=None, rank_rows=False, rank_cols=False,
                far_levels=DEFAULT_FAR_LEVELS, top_k=15, ks=(1, 5, 10), block=DEFAULT_BLOCK, normalize=False,
                precision="fp32", progress=False, names=("rows", "cols")):
    """Rows a (images / queries) x columns b (captions / gallery). Returns {"verification": ... (cap_img_index
    given), "rows": ranking with rows as queries (rank_rows), "cols": ranking with columns as queries (rank_cols)}.
    """
    if numba is None:
        raise RuntimeError("metrics.py needs numba (pip install numba; it is in requirements.txt)")
    nA, dA, _ = _rows_of(a_emb, names[0])
    nB, dB, _ = _rows_of(b_emb, names[1])
    precision = pick_precision(precision, nA * nB)
    if dA != dB:
        raise ValueError(f"{names[0]} is {dA}-d but {names[1]} is {dB}-d")
    apid = _ints(a_pids, names[0].replace("emb", "pids"), nA)
    bpid = _ints(b_pids, names[1].replace("emb", "pids"), nB)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")
    ver = cap_img_index is not None
    if ver:
        cii = _ints(cap_img_index, "cap_img_index", nB)
        levels = _far_levels(far_levels)
        top_k = int(top_k)
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if nB and (cii.min() < -1 or cii.max() >= nA):
            raise ValueError(f"cap_img_index: values must be in [-1, {nA}) (-1 = caption's image not evaluated)")
        bad = np.flatnonzero((cii >= 0) & (bpid != apid[np.maximum(cii, 0)]))
        if len(bad):
            j = int(bad[0])
            raise ValueError(f"caption {j} has id {bpid[j]} but its image {cii[j]} has id {apid[cii[j]]} "
                             f"(arguments in the wrong order?)")
        if not (cii >= 0).any():
            raise ValueError("no positive pairs: no caption belongs to one of the images (check cap_img_index)")
    out = {}
    if nA == 0 or nB == 0:
        for key, on, nq, ng in (("rows", rank_rows, nA, nB), ("cols", rank_cols, nB, nA)):
            if on:
                out[key] = _rank_result(np.zeros(0, np.int64), np.zeros(nq, np.int64), nq, ng, ks)
        return out
    T = _num_threads()

    oa, ob, ka, kb = _id_order(apid, bpid)
    clo, chi = np.searchsorted(kb, ka, "left"), np.searchsorted(kb, ka, "right")  # per sorted row
    rlo, rhi = np.searchsorted(ka, kb, "left"), np.searchsorted(ka, kb, "right")  # per sorted column
    t_start = time.time()
    R, C = _tiles(nA, nB, block)
    A = _prepare(a_emb, names[0], oa, -(-nA // R) * R, normalize, precision)
    B = _prepare(b_emb, names[1], ob, -(-nB // C) * C, normalize, precision)
    tiles = _Tiles(A, B, R, C, nA, nB, precision)
    timing = dict(prepare_s=time.time() - t_start)
    t_band = time.time()

    # ---- band pre-pass: every same-identity score (row-major pair order) + a histogram of the band's negatives
    p_row = chi - clo
    roff = np.concatenate([[0], np.cumsum(p_row)[:-1]]).astype(np.int64)
    n_pairs = int(p_row.sum())
    ps = np.empty(n_pairs, np.float32)
    hist = np.zeros((T, _SAMPLE_BINS) if ver else (T, 1), np.int64)
    band = []
    for i0 in range(0, nA, R):
        i1 = min(nA, i0 + R)
        if chi[i1 - 1] > clo[i0]:
            band += [(i0, j0) for j0 in range(clo[i0] // C * C, chi[i1 - 1], C)]
    for i0, j0 in band:
        nr, nc = tiles.score(i0, j0)
        _band_kernel(tiles.np, tiles.bits, i0, j0, nr, nc, clo, chi, roff, ps, hist, ver)
    pr = np.repeat(np.arange(nA), p_row)  # sorted row of each pair
    pc = clo[pr] + (np.arange(n_pairs) - roff[pr])  # sorted column of each pair

    # ---- ranking set-up: each query's positives sorted best-first (score desc, original gallery index asc)
    f0, i0_ = np.zeros(1, np.float32), np.zeros(1, np.int64)
    rthr_s, rthr_i, rthr_c = f0, i0_, i0_
    beat_r = np.zeros(n_pairs if rank_rows else 1, np.int64)
    big_r = np.zeros(n_pairs if rank_rows else 1, np.int64)
    if rank_rows:
        o = _sorted_pairs(pr, ps, ob[pc])
        rthr_s, rthr_i, rthr_c = ps[o], ob[pc][o], pc[o]
        row_buf = np.empty((T, C), np.float32)
    cnum = (rhi - rlo).astype(np.int64)
    coff = np.concatenate([[0], np.cumsum(cnum)[:-1]]).astype(np.int64)
    if rank_cols:
        o = _sorted_pairs(pc, ps, oa[pr])
        cthr_s, cthr_i, cthr_r = ps[o], oa[pr][o], pr[o]
        pcap_c = max(1, min(_PCAP, int(cnum.max())))
        small = cnum <= pcap_c
        colof = np.repeat(np.arange(nB), cnum)
        kk = np.arange(n_pairs) - coff[colof]
        sm = small[colof]
        nb_pad = B.shape[0]
        dthr = np.full((pcap_c, nb_pad), np.inf, np.float32)
        dthr_i, dthr_r = np.zeros((pcap_c, nb_pad), np.int64), np.full((pcap_c, nb_pad), -1, np.int64)
        dthr[kk[sm], colof[sm]], dthr_i[kk[sm], colof[sm]], dthr_r[kk[sm], colof[sm]] = \
            cthr_s[sm], cthr_i[sm], cthr_r[sm]
        beat_c = np.zeros((pcap_c, nB), np.int64)
        big_c = np.zeros(n_pairs, np.int64)
        big_cols = np.flatnonzero(~small)
        pm_tile = [int(np.minimum(cnum[j0:j0 + C], pcap_c).max()) for j0 in range(0, nB, C)]
        gt, eq = np.zeros((T, pcap_c, C), np.int32), np.zeros((T, pcap_c, C), np.int32)

    # ---- verification set-up: positives, EER region and FAR windows from the band sample
    n_neg = nA * nB - n_pairs
    if ver:
        inv_a, inv_b = np.empty(nA, np.int64), np.empty(nB, np.int64)
        inv_a[oa], inv_b[ob] = np.arange(nA), np.arange(nB)
        pos_j = np.flatnonzero(cii >= 0)
        pos_i = cii[pos_j]
        r_, c_ = inv_a[pos_i], inv_b[pos_j]
        pos_s = ps[roff[r_] + c_ - clo[r_]]
        V = _Verification(pos_s, n_neg, levels, top_k, hist.sum(0), T)

    # ---- the pass
    bar = None
    if progress:
        from tqdm import tqdm
        what = " + ".join((["verification"] if ver else []) + (["image->text" if ver else "retrieval"] if rank_rows
                                                                 else []) + (["text->image"] if rank_cols else []))
        print(f"metrics: {nA:,} x {nB:,} = {nA * nB:,} pairs ({what}) in one pass; {len(band)} band tiles took "
              f"{time.time() - t_band:.1f}s", file=sys.stderr, flush=True)
        bar = tqdm(total=nA * nB, unit="pair", unit_scale=True, desc="scoring", file=sys.stderr, mininterval=2)
    timing["band_s"], timing["band_tiles"] = time.time() - t_band, len(band)
    t_pass = time.time()
    gemm0 = tiles.gemm_s
    all_tiles = tiles.all()
    S = tiles.np
    for q, (i0, j0) in enumerate(all_tiles):
        nr, nc = tiles.score(i0, j0)
        if ver:
            V.fa_n[:] = 0
            _ver_kernel(S, i0, j0, nr, nc, clo, chi, T, V.hlo, V.hsc, V.hmax, V.hist, V.negmm,
                        V.ua, V.ub, V.ur, V.ecnt, V.eab, V.rare, V.edges, V.inwin, V.icnt, V.wbuf, V.wn,
                        np.float32(V.fa_thr), V.fa_s, V.fa_r, V.fa_c, V.fa_n)
            if top_k:
                V.merge_false_accepts(tiles, i0, j0, nr, nc, clo, chi, oa, ob)
        if rank_rows:
            _row_kernel(S, i0, j0, nr, nc, T, p_row, roff, rthr_s, rthr_i, rthr_c, beat_r, big_r, clo, chi, ob,
                        _PCAP, row_buf)
        if rank_cols:
            pm = pm_tile[j0 // C]
            if pm:
                _col_kernel(S, i0, j0, nr, nc, T, pm, dthr, gt, eq)
                _col_merge(S, i0, j0, nr, nc, pm, dthr, dthr_i, dthr_r, gt, eq, oa, beat_c)
            bc = big_cols[(big_cols >= j0) & (big_cols < j0 + nc)]
            if len(bc):
                _col_big_kernel(S, i0, j0, nr, bc, rlo, rhi, cnum, coff, cthr_s, cthr_i, oa, big_c)
        if bar is not None:
            if q == 0:
                est = (time.time() - t_pass) * len(all_tiles)
                bar.write(f"metrics: estimated {est:.0f}s for the pass (timed on the first {nr}x{nc} block)",
                          file=sys.stderr)
            bar.update(nr * nc)
    if bar is not None:
        bar.close()
    timing.update(pass_s=time.time() - t_pass, pass_gemm_s=tiles.gemm_s - gemm0, tiles=len(all_tiles),
                  tile_shape=[R, C], threads=T, precision=precision)
    t_fin = time.time()
    n_scored = tiles.n_scored

    if ver:
        out["verification"] = V.finish(tiles, clo, chi, oa, ob, pos_s, pos_i, pos_j, nA, nB, n_pairs - len(pos_s))
    if rank_rows:  # beats of the k-th positive; a big row counted its non-positives by bucket (+ k positives)
        k_in = np.arange(n_pairs) - np.repeat(roff, p_row)
        isbig = np.repeat(p_row > _PCAP, p_row)
        beats = np.where(isbig, k_in + _seg_cumsum(big_r, p_row), beat_r)
        out["rows"] = _rank_result(beats, p_row, nA, nB, ks)
    if rank_cols:
        beats = np.where(sm, beat_c[np.minimum(kk, pcap_c - 1), colof], kk + _seg_cumsum(big_c, cnum))
        out["cols"] = _rank_result(beats, cnum, nB, nA, ks)
    timing.update(finish_s=time.time() - t_fin, extra_tiles=tiles.n_scored - n_scored)
    out["timing"] = timing
    return out


def _seg_cumsum(x, P):
    """Inclusive cumulative sums of x within consecutive segments of lengths P."""
    cs = np.cumsum(x)
    starts = (np.cumsum(P) - P)[P > 0]
    return cs - np.repeat(cs[starts] - x[starts], P[P > 0])


class _Verification:
    """What _ver_kernel needs (coarse histogram, EER region, FAR windows, false-accept candidates) and the figures
    from what it counted."""

    def __init__(self, pos_s, n_neg, levels, top_k, sample, T):
        self.T, self.n_neg, self.levels, self.top_k = T, n_neg, levels, top_k
        u, self.u_cnt = np.unique(pos_s, return_counts=True)  # u_1 < ... < u_m (float32)
        m = self.m = len(u)
        self.u = u
        n_pos = len(pos_s)
        self.frr_lt = np.cumsum(self.u_cnt) - self.u_cnt  # #{p < u_k}
        desc = np.cumsum(sample[::-1])[::-1]  # desc[b] = #{sample negatives in bins >= b}
        n_s = int(desc[0])
        nz = np.flatnonzero(sample)

        # coarse histogram over the positives' and the sample's range (outside: clamped into the end cells)
        lo = min(float(u[0]), _bin_floor(nz[0]) if len(nz) else math.inf)
        hi = max(float(u[-1]), _bin_floor(nz[-1] + 1) if len(nz) else -math.inf)
        lo = lo if math.isfinite(lo) else float(u[0])
        hi = hi if math.isfinite(hi) else float(u[-1])
        self.hlo = np.float32(lo)
        self.hsc = np.float32(min(_HIST_BINS / (hi - lo), 1e30) if hi > lo else 1.0)
        self.hmax = np.float32(_HIST_BINS - 1)
        self.hist = np.zeros((T, _HIST_BINS), np.int64)
        self.negmm = np.tile(np.array([[np.inf, -np.inf]], np.float32), (T, 1))

        # EER region: positives u_a..u_b around the predicted crossing of FAR and FRR (sample FAR at each
        # positive; margin 6 binomial standard deviations + 0.2%). Negatives in [u_a, u_b+1) are counted exactly
        # between consecutive positives; above it only counted. finish() proves the crossing lies inside.
        if n_s and m > 2:
            bits = u.view(np.int32).astype(np.int64)
            bins = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> 12) + _SAMPLE_BINS // 2
            d_est = desc[bins] / n_s - self.frr_lt / n_pos
            delta = 6.0 * math.sqrt(0.25 / n_s) + 0.002
            a = max(0, int(np.count_nonzero(d_est >= delta)) - 1)
            b = min(m - 1, int(np.count_nonzero(d_est > -delta)))
        else:
            a, b = 0, m - 1
        self.ea, self.eb = a, b
        self.ua = np.float32(u[a])
        self.ub = np.float32(u[b + 1]) if b + 1 < m else np.float32(np.inf)
        self.ur = u[a:b + 1].copy()
        self.ecnt, self.eab = np.zeros((T, b - a + 2), np.int64), np.zeros(T, np.int64)

        self.ks = [_allowed_false_accepts(x, n_neg) if n_neg else 0 for x in levels]
        self.resolvable = [bool(n_neg and (k > 0 or x == 0.0)) for k, x in zip(self.ks, levels)]
        # false accepts: at least top_k band negatives are >= the floor of the bin holding the top_k-th largest,
        # so the final top_k-th false accept is too: a valid starting filter
        bt = int(np.count_nonzero(desc >= top_k)) - 1 if top_k else -1
        self.fa_thr = _bin_floor(bt) if bt >= 0 else (-np.inf if top_k else np.inf)
        self.fa = None  # the top_k false accepts so far: (score, i, j) arrays sorted by (-score, i, j)
        self.fa_s, self.fa_r, self.fa_c = np.zeros((T, _FA_CAP), np.float32), np.zeros((T, _FA_CAP), np.int64), \
            np.zeros((T, _FA_CAP), np.int64)
        self.fa_n = np.zeros(T, np.int64)

        # FAR windows. Level x allows k false accepts; its threshold sits just above the (k+1)-th largest negative.
        # The band sample (n_s of the n_neg negatives) predicts that value's bin; the window [L, H) spans the
        # predicted rank (k+1) * (1 -+ margin), the margin 6 binomial standard deviations + 3%.
        wins, expect = {}, 0.0
        for q, (k, x) in enumerate(zip(self.ks, levels)):
            if not self.resolvable[q] or k == 0:
                continue
            if n_s == 0:
                wins[q] = (-math.inf, math.inf)
                expect += n_neg
                continue
            r_s = (k + 1) * n_s / n_neg
            mg = 6.0 / math.sqrt(max(r_s, 1.0)) + 0.03
            bl = int(np.count_nonzero(desc >= r_s * (1 + mg))) - 1
            bh = int(np.count_nonzero(desc > r_s * (1 - mg))) if r_s * (1 - mg) >= 1 else len(desc)
            wl = _bin_floor(bl) if bl >= 0 else -math.inf
            wh = _bin_floor(bh) if bh < len(desc) else math.inf
            wins[q] = (wl, wh)
            expect += (int(desc[max(bl, 0)]) - (int(desc[bh]) if bh < len(desc) else 0)) * n_neg / n_s
        edges = {v for w in wins.values() for v in w if math.isfinite(v)}
        if any(w[0] == -math.inf for w in wins.values()):
            edges.add(-math.inf)
        edges = sorted(edges) or [math.inf]
        self.edges = np.array(edges, np.float32)
        E = len(edges)
        lower = np.array(edges, np.float64)
        upper = np.array(edges[1:] + [math.inf], np.float64)
        self.inwin = np.zeros(E + 1, np.bool_)
        for wl, wh in wins.values():  # interval e = [edges[e-1], edges[e]) lies inside a window
            self.inwin[1:] |= (lower >= wl) & (upper <= wh)
        cap = max(1, int(min(_MAX_WINDOW, 1.25 * expect + 1024) / T)) if wins else 1
        self.icnt, self.wbuf, self.wn = np.zeros((T, E + 1), np.int64), np.zeros((T, cap), np.float32), \
            np.zeros(T, np.int64)
        self.windows = wins
        self.rare = np.float32(min(float(self.edges[0]), self.fa_thr))

    def merge_false_accepts(self, tiles, i0, j0, nr, nc, clo, chi, oa, ob):
        """The tile's candidates (s >= fa_thr) into the running top_k (ties by (img_idx, cap_idx))."""
        n = self.fa_n
        if not n.any():
            return
        if (n > self.fa_s.shape[1]).any():  # too many for the per-thread buffers: collect this tile exactly
            tot = int(n.sum())
            s, r, c = np.empty(tot, np.float32), np.empty(tot, np.int64), np.empty(tot, np.int64)
            got = _collect_kernel(tiles.np, i0, j0, nr, nc, clo, chi, np.float32(self.fa_thr), np.float32(np.inf),
                                  s, r, c, 0)
            assert got == tot, "internal error: false-accept candidates do not add up"
        else:
            s = np.concatenate([self.fa_s[t, :n[t]] for t in range(self.T)])
            r = np.concatenate([self.fa_r[t, :n[t]] for t in range(self.T)])
            c = np.concatenate([self.fa_c[t, :n[t]] for t in range(self.T)])
        s_c, i_c, j_c = s.astype(np.float64), oa[r], ob[c]
        if self.fa is not None:
            s_c, i_c, j_c = (np.concatenate([x, y]) for x, y in zip(self.fa, (s_c, i_c, j_c)))
        o = np.lexsort((j_c, i_c, -s_c))[:self.top_k]
        self.fa = (s_c[o], i_c[o], j_c[o])
        if len(o) == self.top_k:
            self.fa_thr = max(self.fa_thr, float(self.fa[0][-1]))

    def _cell(self, x):
        return np.clip((np.asarray(x, np.float32) - self.hlo) * self.hsc, np.float32(0), self.hmax).astype(np.int64)

    def _cell_edges(self):
        """theta[e] = the smallest float32 with cell >= e (e = 1 .. bins-1): the exact value of each cell edge
        under the kernel's float32 arithmetic (found by stepping from the real-number guess)."""
        e = np.arange(1, _HIST_BINS)
        g = (self.hlo + e.astype(np.float64) / float(self.hsc)).astype(np.float32)
        for _ in range(64):
            up = self._cell(g) < e
            if not up.any():
                break
            g[up] = np.nextafter(g[up], np.float32(np.inf))
        for _ in range(64):
            prev = np.nextafter(g, np.float32(-np.inf))
            down = self._cell(prev) >= e
            if not down.any():
                break
            g[down] = prev[down]
        return g

    def finish(self, tiles, clo, chi, oa, ob, pos_s, pos_i, pos_j, nA, nB, n_same_other):
        u, u_cnt, m, n_neg = self.u, self.u_cnt, self.m, self.n_neg
        n_pos = len(pos_s)
        frr_lt = self.frr_lt
        pos_le = np.cumsum(u_cnt)  # #{p <= u_k}
        H = self.hist.sum(0)
        assert H.sum() == n_neg, "internal error: negative counts do not add up"
        theta = self._cell_edges()
        n_theta = np.cumsum(H[::-1])[::-1][1:]  # #{n >= theta[e]}
        a, b = self.ea, self.eb
        ec = self.ecnt.sum(0)
        far_w = int(self.eab.sum()) + np.cumsum(ec[::-1])[::-1][1:]  # #{n >= u_q}, q = a..b
        facts = dict(zip(theta.astype(np.float64).tolist(), n_theta.tolist()))
        facts.update(zip(u[a:b + 1].astype(np.float64).tolist(), far_w.tolist()))
        facts[float(self.ub)] = int(self.eab.sum())
        neg_min, neg_max = float(self.negmm[:, 0].min()), float(self.negmm[:, 1].max())
        lo_u, hi_u = float(u[0]), float(u[-1])
        res = dict(n_pos=n_pos, n_neg=n_neg, verify_count=n_pos + n_neg, n_images=nA, n_captions=nB,
                   n_same_id_pairs=n_same_other, top_k=self.top_k)
        res["score_min"] = min(lo_u, neg_min) if n_neg else lo_u
        res["score_max"] = max(hi_u, neg_max) if n_neg else hi_u
        res["pos_score_mean"] = float(pos_s.astype(np.float64).mean())
        if n_neg:
            d = far_w.astype(object) * n_pos - frr_lt[a:b + 1].astype(object) * n_neg
            if not ((a == 0 or d[0] >= 0) and (b == m - 1 or d[-1] <= 0)):
                # the crossing is outside the region (the sample misled): bound it with the exact counts at the
                # histogram edges, then count the negatives between those edges exactly in one more pass
                cu = self._cell(u)  # theta[cu - 1] <= u < theta[cu]
                n_at = np.concatenate([[n_neg], n_theta, [0]])
                d_lo = n_at[cu + 1].astype(object) * n_pos - frr_lt.astype(object) * n_neg  # <= d(q)
                d_hi = n_at[cu].astype(object) * n_pos - frr_lt.astype(object) * n_neg  # >= d(q)
                a = max(0, int(np.count_nonzero(d_lo >= 0)) - 1)
                b = min(m - 1, int(np.count_nonzero(d_hi > 0)))
                lo_v = float(theta[cu[a] - 1]) if cu[a] >= 1 else -math.inf
                hi_v = float(theta[cu[b]]) if cu[b] < len(theta) else math.inf
                n_hi = int(n_at[cu[b] + 1])
                vals, = _collect_pass(tiles, clo, chi, [(lo_v, hi_v, int(n_at[cu[a]]) - n_hi)],
                                      "the EER region")
                vals.sort()
                far_w = n_hi + len(vals) - np.searchsorted(vals, u[a:b + 1], side="left")
                facts.update(zip(u[a:b + 1].astype(np.float64).tolist(), far_w.tolist()))
                d = far_w.astype(object) * n_pos - frr_lt[a:b + 1].astype(object) * n_neg
            k = int(np.argmin(np.abs(d)))
            far_e, frr_e = int(far_w[k]) / n_neg, int(frr_lt[a + k]) / n_pos
            res.update(eer=100.0 * (far_e + frr_e) / 2, eer_threshold=float(u[a + k]), eer_far=100.0 * far_e,
                       eer_frr=100.0 * frr_e)
        else:
            res.update(eer=None, eer_threshold=None, eer_far=None, eer_frr=None)
        vals = self._level_values(tiles, clo, chi, facts, neg_max) if n_neg else {}
        lv = []
        for q, (x, kx) in enumerate(zip(self.levels, self.ks)):
            e = dict(far=x, label=format_far(x), resolvable=self.resolvable[q], allowed=kx)
            if e["resolvable"]:
                v, n_fa = vals[q]
                bb = int(np.searchsorted(u, np.float32(v), side="right"))  # distinct positives <= v
                e.update(frr=100.0 * (int(pos_le[bb - 1]) if bb else 0) / n_pos, threshold=_next_up(v),
                         far_actual=100.0 * n_fa / n_neg, false_accepts=n_fa)
            else:
                e.update(frr=None, threshold=None, far_actual=None, false_accepts=None)
            lv.append(e)
        res["far_levels"] = lv
        o = np.lexsort((pos_j, pos_i, pos_s))[:self.top_k]
        res["false_rejects"] = [(int(pos_i[q]), int(pos_j[q]), float(pos_s[q])) for q in o]
        res["false_accepts"] = [] if self.fa is None else [(int(i), int(j), float(s)) for s, i, j in zip(*self.fa)]
        # exact ROC points for verification_curve: the histogram edges and the EER region's positive scores
        ct = np.array(sorted(facts), np.float64)
        ct = ct[np.isfinite(ct)]
        res["_curve"] = dict(threshold=ct, far_ge=np.array([facts[v] for v in ct], np.int64),
                             frr_lt=pos_le[np.searchsorted(u, ct.astype(np.float32), side="left") - 1] *
                             (np.searchsorted(u, ct.astype(np.float32), side="left") > 0),
                             n_neg=n_neg, n_pos=n_pos)
        return res

    def _level_values(self, tiles, clo, chi, facts, neg_max):
        """(v, n_fa) per level: v = the (k+1)-th largest negative, n_fa = #{negatives > v}."""
        out = {}
        n_ge = dict(facts)  # value -> exact #{negatives >= value}
        icnt = self.icnt.sum(0)
        tail = np.cumsum(icnt[::-1])[::-1]  # tail[e] = #{counted in intervals >= e}
        for e, v in enumerate(self.edges.tolist()):
            if math.isfinite(v) or v == -math.inf:
                n_ge[v] = int(tail[e + 1])
        n_ge[-math.inf] = self.n_neg
        n_ge[math.inf] = 0
        buf = np.concatenate([self.wbuf[t, :min(self.wn[t], self.wbuf.shape[1])] for t in range(self.T)])
        overflow = bool((self.wn > self.wbuf.shape[1]).any())
        missed = {}
        for q, (k, x) in enumerate(zip(self.ks, self.levels)):
            if not self.resolvable[q]:
                continue
            if k == 0:
                out[q] = (float(neg_max), 0)
                continue
            lo, hi = self.windows[q]
            n_hi, n_lo = n_ge[float(np.float32(hi))], n_ge[float(np.float32(lo))]
            if not overflow and n_hi <= k < n_lo:
                sel = buf[(buf >= lo) & (buf < hi)]
                assert len(sel) == n_lo - n_hi, "internal error: window counts do not add up"
                v = -np.partition(-sel, k - n_hi)[k - n_hi]
                out[q] = (float(v), n_hi + int(np.count_nonzero(sel > v)))
            else:
                missed[q] = k
        if missed:
            # the tightest exact bracket [a, b) with n_ge(a) > k >= n_ge(b) (histogram edges, window edges, the
            # EER region): one more pass collects the negatives inside it
            vals = np.array(sorted(n_ge))
            cnts = np.array([n_ge[v] for v in vals])
            brackets = {}
            for q, k in missed.items():
                a = float(vals[cnts > k].max())
                b = float(vals[cnts <= k].min())
                brackets[q] = (a, b, n_ge[a] - n_ge[b], n_ge[b])
            got = _collect_pass(tiles, clo, chi, [br[:3] for br in brackets.values()],
                                "FAR windows (" + ("overflow" if overflow else "the sample misled") + ")")
            for (q, (a, b, cnt, nb)), sel in zip(brackets.items(), got):
                k = missed[q]
                v = -np.partition(-sel, k - nb)[k - nb]
                out[q] = (float(v), nb + int(np.count_nonzero(sel > v)))
        return out


def _collect_pass(tiles, clo, chi, ranges, why):
    """One more pass over every tile: the negatives in each [lo, hi) (their exact counts given) as float32 arrays.
    Only when a prediction from the band sample missed; memory: the counts (at most a histogram cell each)."""
    print(f"metrics: one more pass for {why}: collecting {sum(r[2] for r in ranges):,} negatives",
          file=sys.stderr, flush=True)
    got = [[np.empty(n, np.float32), np.empty(n, np.int64), np.empty(n, np.int64), 0] for _, _, n in ranges]
    for i0, j0 in tiles.all():
        nr, nc = tiles.score(i0, j0)
        for (lo, hi, _), g in zip(ranges, got):
            g[3] = _collect_kernel(tiles.np, i0, j0, nr, nc, clo, chi, np.float32(lo), np.float32(hi),
                                   g[0], g[1], g[2], g[3])
    for (_, _, n), g in zip(ranges, got):
        assert g[3] == n, "internal error: collected counts do not add up"
    return [g[0] for g in got]


def _rank_result(beats, P, n_q, n_g, ks):
    """IRRA's figures from beats[slot] = #{gallery items ranking before the query's k-th positive} (slots: each
    query's P[q] positives in order, best first); that positive's 1-based rank is 1 + beats."""
    valid = P > 0
    n_valid = int(valid.sum())
    res = dict(n_queries=n_valid, n_excluded=n_q - n_valid, n_gallery=n_g, ks=list(ks))
    if n_valid == 0:
        res.update({f"R@{k}": None for k in ks}, mAP=None, mINP=None)
        return res
    Pv = P[valid]
    starts = np.cumsum(Pv) - Pv
    k_in = np.arange(len(beats)) - np.repeat(starts, Pv)  # k, 0-based, within the query
    ranks = 1.0 + beats.astype(np.float64)
    ap = np.add.reduceat((k_in + 1) / ranks, starts) / Pv
    inp = Pv / ranks[starts + Pv - 1]
    r1 = ranks[starts]
    res.update({f"R@{k}": 100.0 * int((r1 <= k).sum()) / n_valid for k in ks},
               mAP=100.0 * float(ap.sum()) / n_valid, mINP=100.0 * float(inp.sum()) / n_valid)
    return res


# ----------------------------------------------------------------------------------------------------------------
# the public functions

def verification(img_emb, cap_emb, cap_img_index, img_pids, cap_pids, far_levels=DEFAULT_FAR_LEVELS, top_k=15,
                 block=DEFAULT_BLOCK, normalize=False, progress=False, precision="fp32"):
    """Image-caption verification as the seed prints it. Returns a dict (see the keys below).
    progress=True prints the pair count, a time estimate (from the first block) and a tqdm bar to stderr.

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
        exactly in integers; ties -> the smallest t); EER = (FAR(t*) + FRR(t*)) / 2, threshold t*. It is exact:
        the negatives are counted exactly between consecutive distinct positive scores.
      All rates are returned in percent.
    Error lists: top_k false rejects = the lowest-scoring positives, top_k false accepts = the highest-scoring
      negatives, each as (img_idx, cap_idx, score); ties by (img_idx, cap_idx) ascending.
    Memory: float32 copies of the inputs + O(block) + O(captions) + the FAR windows (at most _MAX_WINDOW values),
    independent of the number of pairs. Keys: n_pos, n_neg, verify_count, n_images, n_captions, n_same_id_pairs,
    score_min/max, pos_score_mean, eer, eer_threshold, eer_far, eer_frr, far_levels (list of dicts: far, label,
    resolvable, allowed, frr, threshold, far_actual, false_accepts), false_rejects, false_accepts, _curve (numpy
    arrays for verification_curve; to_jsonable leaves keys starting with "_" out).
    """
    return _score_pass(img_emb, img_pids, cap_emb, cap_pids, cap_img_index=cap_img_index, far_levels=far_levels,
                       top_k=top_k, block=block, normalize=normalize, precision=precision, progress=progress,
                       names=("img_emb", "cap_emb"))["verification"]


def retrieval(query_emb, query_pids, gallery_emb, gallery_pids, ks=(1, 5, 10), block=DEFAULT_BLOCK,
              normalize=False, progress=False, precision="fp32"):
    """Ranking metrics as IRRA's evaluator computes them, in percent. progress=True: see `verification`.

    Each query ranks the whole gallery by score (dot product, float32) descending; equal scores are ordered by
    gallery index ascending (a stable sort), so results are deterministic. A hit is any gallery item with the
    query's pid. Per query with P positives at 1-based ranks r_1 < ... < r_P:
      R@K: 100 if r_1 <= K;  AP = mean_k (k / r_k);  INP = P / r_P  (mINP: the rank of the hardest positive).
    R@K, mAP, mINP are means over queries that have at least one positive; queries without one are excluded
    and counted (n_excluded). Used both ways: text->image (queries = captions) and image->text.
    Only the ranks of the positives are computed (no sort of the gallery): an item is counted against the
    query's positives it beats, so each positive's rank is exact, ties included.
    """
    return _score_pass(query_emb, query_pids, gallery_emb, gallery_pids, rank_rows=True, ks=ks, block=block,
                       normalize=normalize, precision=precision, progress=progress,
                       names=("query_emb", "gallery_emb"))["rows"]


def verification_curve(result, max_points=2000):
    """ROC / DET curve of a `verification` result without any pair in memory: the exact staircase corners (every
    distinct positive score t: FAR(t), FRR(t) as defined in `verification`), thinned to at most max_points
    corners spread evenly over FRR and over log10(FAR). Returns a dict of float64 numpy arrays, thresholds
    ascending: {"threshold": t, "far": FAR(t), "frr": FRR(t)} as fractions in [0, 1] (not percent), plus
    "n_pos" and "n_neg". FAR is non-increasing and FRR non-decreasing along the arrays."""
    c = result.get("_curve")
    if c is None:
        raise ValueError("verification_curve needs the result of metrics.verification / evaluate_embeddings "
                         "(its '_curve' entry; results read back from JSON do not have it)")
    t = np.asarray(c["threshold"], np.float64)
    far = np.asarray(c["far_ge"], np.float64) / max(1, c["n_neg"])
    frr = np.asarray(c["frr_lt"], np.float64) / max(1, c["n_pos"])
    if len(t) > max_points:
        half = max(1, max_points // 2)
        lo_far = float(far[far > 0].min()) if (far > 0).any() else 1.0
        by_far = np.searchsorted(-far, -np.logspace(0, math.log10(lo_far), half), side="left")  # far <= level
        keep = np.unique(np.concatenate([np.round(np.linspace(0, len(t) - 1, half)).astype(np.int64),
                                         by_far.clip(0, len(t) - 1)]))
        t, far, frr = t[keep], far[keep], frr[keep]
    return dict(threshold=t, far=far, frr=frr, n_pos=int(c["n_pos"]), n_neg=int(c["n_neg"]))

# ----------------------------------------------------------------------------------------------------------------
# both, and the headline numbers

def evaluate_embeddings(img_emb, cap_emb, cap_img_index, img_pids, cap_pids, far_levels=DEFAULT_FAR_LEVELS,
                        top_k=15, ks=(1, 5, 10), block=DEFAULT_BLOCK, normalize=False, progress=False,
                        precision="fp32"):
    """verification + text->image and image->text retrieval on the same embeddings, in ONE pass over the pairs
    (each score computed once serves all three). Returns {"verification": ..., "t2i": ..., "i2t": ...,
    "headline": flat dict (see `headline`), "timing": seconds per stage (prepare_s, band_s, pass_s and its
    pass_gemm_s, finish_s) with tiles, tile_shape, threads, precision, extra_tiles (fallback passes)}.
    precision: "fp32", "bf16" or "auto" (see the module docstring)."""
    r = _score_pass(img_emb, img_pids, cap_emb, cap_pids, cap_img_index=cap_img_index, rank_rows=True,
                    rank_cols=True, far_levels=far_levels, top_k=top_k, ks=ks, block=block, normalize=normalize,
                    precision=precision, progress=progress, names=("img_emb", "cap_emb"))
    out = dict(verification=r["verification"], t2i=r["cols"], i2t=r["rows"], timing=r["timing"])
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
    """Plain JSON types (tuples -> lists, numpy scalars -> Python, non-finite floats -> None); dict keys starting
    with "_" are left out."""
    if isinstance(obj, dict):  # keys starting with "_" hold large numpy internals (the ROC staircase)
        return {str(k): to_jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
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
