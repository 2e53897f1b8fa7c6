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
Scores are computed one block of rows at a time (`block` = the most scores held at once), never as a dense N x M
matrix, and every figure is exact for those float32 scores -- equal to a sort-everything reference -- not a
histogram approximation. How (see `verification`): the positives (few) are scored first; then each block of
negatives is counted into the intervals between consecutive distinct positive scores, which gives the exact FAR
at every positive-score threshold (hence the exact EER and FRR at each FAR level), while the largest negatives
are kept exactly (a running top-k), which gives the exact FAR thresholds and the false-accept list.
"""
import math

import numpy as np
import torch

DEFAULT_FAR_LEVELS = (1e-3, 1e-4, 1e-5, 1e-6, 0.0)
DEFAULT_BLOCK = 1 << 22  # scores held at once (~16 MiB of float32); the per-block work keeps a few copies of it
_CELLS_PER_POSITIVE = 16  # resolution of the counting lookup table (speed only; results are exact at any value)
_MAX_CELLS = 1 << 22

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
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if normalize:
        t = torch.nn.functional.normalize(t, dim=1)
    return t


def _ints(x, name, n, device):
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name}: expected {n} integers, got shape {list(t.shape)}")
    if t.dtype == torch.bool or t.is_complex() or (t.is_floating_point() and not bool((t == t.round()).all())):
        raise ValueError(f"{name}: expected integers, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _far_levels(levels):
    out = []
    for x in levels:
        x = float(x)
        if not 0.0 <= x < 1.0:
            raise ValueError(f"FAR level {x} is not in [0, 1)")
        out.append(x)
    return out


def _rows_per_block(block, ncols):
    if int(block) < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return max(1, int(block) // max(1, ncols))


class _SameId:
    """The (row, col) pairs of one block whose ids are equal, found through sorted column ids: O(pairs), not O(B*M)."""

    def __init__(self, col_pids):
        self.sorted, self.order = torch.sort(col_pids, stable=True)

    def counts(self, row_pids):
        lo = torch.searchsorted(self.sorted, row_pids, right=False)
        return lo, torch.searchsorted(self.sorted, row_pids, right=True) - lo

    def pairs(self, row_pids):
        lo, cnt = self.counts(row_pids)
        dev = row_pids.device
        rows = torch.repeat_interleave(torch.arange(len(row_pids), device=dev), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        offs = torch.arange(len(rows), device=dev) - torch.repeat_interleave(first, cnt)
        cols = self.order[torch.repeat_interleave(lo, cnt) + offs]
        return rows, cols, cnt


def _f32(v):
    return float(np.float32(v))


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
                 block=DEFAULT_BLOCK, normalize=False):
    """Image-caption verification as the seed prints it. Returns a dict (see the keys at the end).

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

    How it stays exact in bounded memory: rows of images are scored in blocks (block // n_captions rows at a
    time). Pass 1 scores only the positives (per image block, against its own captions: the same GEMM blocks, so
    the same float32 bits, as pass 2). Pass 2 scores each block against all captions, masks same-identity pairs
    (found through sorted ids, not an N x M mask) and counts its negatives into the intervals between consecutive
    distinct positive scores u_1 < ... < u_m (bucket b = #{u <= s}). The bucket of most scores comes from a
    lookup table over a uniform grid: cell(s) = int(clamp((s - lo) * scale)) is monotone in s (IEEE rounding is
    monotone), so a score in a cell holding no positive has bucket = #{u : cell(u) < cell(s)}, exactly; scores in
    cells holding a positive go through an exact binary search. FAR at every u_k is then a suffix sum of the
    bucket counts. The largest negatives are kept exactly by a running top-K (K = k+1 of the loosest FAR level)
    filtered by the running K-th value, and a running top_k of (score, i, j) gives the false accepts.
    Memory: the float32 inputs + O(block) + O(K) (K = 1e-3 of the negatives for the default levels).
    """
    img = _emb(img_emb, "img_emb", normalize=normalize)
    dev = img.device
    cap = _emb(cap_emb, "cap_emb", device=dev, normalize=normalize)
    if cap.shape[1] != img.shape[1]:
        raise ValueError(f"img_emb is {img.shape[1]}-d but cap_emb is {cap.shape[1]}-d")
    n_img, n_cap = img.shape[0], cap.shape[0]
    ipid = _ints(img_pids, "img_pids", n_img, dev)
    cpid = _ints(cap_pids, "cap_pids", n_cap, dev)
    cii = _ints(cap_img_index, "cap_img_index", n_cap, dev)
    levels = _far_levels(far_levels)
    top_k = int(top_k)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if n_cap and (int(cii.min()) < -1 or int(cii.max()) >= n_img):
        raise ValueError(f"cap_img_index: values must be in [-1, {n_img}) (-1 = caption's image not evaluated)")
    has_img = cii >= 0
    if bool((cpid[has_img] != ipid[cii[has_img]]).any()):
        j = int(torch.nonzero(has_img & (cpid != ipid[cii.clamp(min=0)]))[0])
        raise ValueError(f"caption {j} has id {int(cpid[j])} but its image {int(cii[j])} has id "
                         f"{int(ipid[cii[j]])} (arguments in the wrong order?)")
    rows = _rows_per_block(block, n_cap)
    capT = cap.t()

    # ---- pass 1: positive scores, block by block with the same row blocks as pass 2
    cii_sorted, cii_order = torch.sort(cii, stable=True)
    pos_j, pos_s = [], []
    for i0 in range(0, n_img, rows):
        i1 = min(n_img, i0 + rows)
        a, b = (int(v) for v in torch.searchsorted(cii_sorted, torch.tensor([i0, i1], device=dev)))
        if a == b:
            continue
        cols = cii_order[a:b]
        s = torch.mm(img[i0:i1], cap[cols].t())  # same layout as capT: same GEMM path
        pos_j.append(cols)
        pos_s.append(s[cii[cols] - i0, torch.arange(len(cols), device=dev)])
    if not pos_j:
        raise ValueError("no positive pairs: no caption belongs to one of the images (check cap_img_index)")
    pos_j, pos_s = torch.cat(pos_j), torch.cat(pos_s)
    pos_i = cii[pos_j]
    n_pos = len(pos_s)
    u, u_cnt = torch.unique(pos_s, sorted=True, return_counts=True)  # u_1 < ... < u_m
    m = len(u)
    pos_le = torch.cumsum(u_cnt, 0)  # #{p <= u_k}

    same = _SameId(cpid)
    n_same = int(same.counts(ipid)[1].sum())
    n_neg = n_img * n_cap - n_same

    # FAR levels: k allowed false accepts each; keep the K largest negatives exactly, K = max(k) + 1
    ks = [_allowed_false_accepts(x, n_neg) if n_neg else 0 for x in levels]
    K = min(n_neg, max([k + 1 for k, x in zip(ks, levels) if n_neg and (k > 0 or x == 0.0)], default=0))

    # lookup table: cell(s) monotone; a cell without a positive maps to one bucket exactly
    lo_u, hi_u = float(u[0]), float(u[-1])
    n_cells = int(min(_MAX_CELLS, max(64, _CELLS_PER_POSITIVE * m)))
    scale = _f32(min(n_cells / (hi_u - lo_u), 1e30)) if hi_u > lo_u else 1.0
    lo2 = _f32(lo_u - 2.0 / scale)  # u_1 lands near cell 2: cell 0 (everything below, and -inf) stays empty

    def cell_of(x, out=None):  # the same two float32 ops for positives and scores: the same monotone map
        t = torch.sub(x, lo2, out=out)
        t.mul_(scale)
        return t

    pc = cell_of(u.clone())
    pc_max = float(pc.max())
    cmax = math.floor(pc_max) + 1.0  # values above every positive's cell clamp here (an empty cell)
    pcell = pc.clamp_(0.0, cmax).to(torch.int64)
    n_tab = int(cmax) + 1
    has = torch.zeros(n_tab, dtype=torch.bool, device=dev)
    has[pcell] = True
    lt = torch.searchsorted(pcell, torch.arange(n_tab, device=dev), right=False)  # #{u : cell(u) < c}

    hist = torch.zeros(n_tab, dtype=torch.int64, device=dev)
    exact = torch.zeros(m + 1, dtype=torch.int64, device=dev)
    n_masked = 0
    neg_min, neg_max = math.inf, -math.inf
    buf, n_buf, tau = [], 0, None  # running top-K negative values (tau: the K-th largest once known)
    fa = None  # running top_k false accepts: (score desc, i, j) as numpy arrays
    tmp = torch.empty(rows * n_cap, dtype=torch.float32, device=dev)
    ci = torch.empty(rows * n_cap, dtype=torch.int64, device=dev)

    # ---- pass 2: negatives
    for i0 in range(0, n_img, rows):
        i1 = min(n_img, i0 + rows)
        S = torch.mm(img[i0:i1], capT)
        flat = S.view(-1)
        r, c, _ = same.pairs(ipid[i0:i1])
        n_blk_neg = flat.numel() - len(r)
        if n_blk_neg == 0:
            continue
        S[r, c] = math.inf
        neg_min = min(neg_min, float(flat.amin()))
        S[r, c] = -math.inf
        n_masked += len(r)

        # counting: cells, then exact binary search for scores in cells that hold a positive
        t = cell_of(S, out=tmp[:flat.numel()].view_as(S)).view(-1).clamp_(0.0, cmax)
        cb = ci[:flat.numel()]
        cb.copy_(t)
        hist += torch.bincount(cb, minlength=n_tab)
        amb = has[cb]
        if bool(amb.any()):
            exact += torch.bincount(torch.bucketize(flat[amb], u, right=True), minlength=m + 1)

        # the K largest negatives (values only)
        if K:
            v = flat[flat > (tau if tau is not None else -math.inf)]
            if len(v):
                buf.append(v)
                n_buf += len(v)
                if n_buf >= 2 * K:
                    top = torch.topk(torch.cat(buf), K, sorted=False).values
                    buf, n_buf, tau = [top], K, float(top.min())

        # the top_k false accepts, ties by (i, j): take every tie of the block's k-th score, lowest index first
        if top_k:
            kk = min(top_k, n_blk_neg)
            vals, idx = torch.topk(flat, kk)
            neg_max = max(neg_max, float(vals[0]))
            kth = float(vals[-1])
            if fa is None or len(fa[0]) < top_k or kth >= fa[0][-1]:
                # ties at the block's k-th score may be cut arbitrarily by topk: take the lowest indices instead
                gt = idx[vals > kth]
                eq = torch.nonzero(flat == kth).view(-1)[:kk - len(gt)]
                idx = torch.cat([gt, eq])
            s_c = flat[idx].cpu().numpy().astype(np.float64)
            i_c = (idx // n_cap + i0).cpu().numpy()
            j_c = (idx % n_cap).cpu().numpy()
            if fa is not None:
                s_c, i_c, j_c = (np.concatenate([a, b]) for a, b in zip(fa, (s_c, i_c, j_c)))
            o = np.lexsort((j_c, i_c, -s_c))[:top_k]
            fa = (s_c[o], i_c[o], j_c[o])
        else:
            neg_max = max(neg_max, float(flat.amax()))

    # ---- assemble
    counts = exact.clone()
    free = ~has
    counts.index_add_(0, lt[free], hist[free])
    counts[0] -= n_masked
    counts = counts.cpu().numpy()
    assert counts.sum() == n_neg and (counts >= 0).all(), "internal error: negative counts do not add up"
    far_ge = np.cumsum(counts[::-1])[::-1][1:]  # far_ge[k] = #{n >= u_k}  (bucket >= k+1)
    pos_le_np = pos_le.cpu().numpy()
    u_np = u.cpu().numpy().astype(np.float64)
    frr_lt = pos_le_np - u_cnt.cpu().numpy()  # #{p < u_k}

    res = dict(n_pos=n_pos, n_neg=n_neg, verify_count=n_pos + n_neg, n_images=n_img, n_captions=n_cap,
               n_same_id_pairs=n_same - n_pos, top_k=top_k)
    pos_min, pos_max = float(u[0]), float(u[-1])
    res["score_min"] = min(pos_min, neg_min) if n_neg else pos_min
    res["score_max"] = max(pos_max, neg_max) if n_neg else pos_max
    res["pos_score_mean"] = float(pos_s.double().mean())

    if n_neg:
        if n_neg * n_pos < (1 << 62):
            d = np.abs(far_ge.astype(np.int64) * n_pos - frr_lt.astype(np.int64) * n_neg)
        else:  # exact big integers
            d = np.abs(far_ge.astype(object) * n_pos - frr_lt.astype(object) * n_neg)
        k = int(np.argmin(d))
        far_e, frr_e = float(far_ge[k]) / n_neg, float(frr_lt[k]) / n_pos
        res.update(eer=100.0 * (far_e + frr_e) / 2, eer_threshold=float(u_np[k]), eer_far=100.0 * far_e,
                   eer_frr=100.0 * frr_e)
    else:
        res.update(eer=None, eer_threshold=None, eer_far=None, eer_frr=None)

    top_vals = None
    if K:
        top_vals = torch.sort(torch.cat(buf), descending=True).values[:K].cpu().numpy()
    lv = []
    for x, kx in zip(levels, ks):
        e = dict(far=x, label=format_far(x), resolvable=bool(n_neg and (kx > 0 or x == 0.0)), allowed=kx)
        if e["resolvable"]:
            v = float(top_vals[kx])  # the (k+1)-th largest negative
            thr = _next_up(v)
            b = int(np.searchsorted(u_np, v, side="right"))  # distinct positives <= v
            n_rej = int(pos_le_np[b - 1]) if b else 0
            n_fa = int(np.count_nonzero(top_vals[:kx + 1] > v))
            e.update(frr=100.0 * n_rej / n_pos, threshold=thr, far_actual=100.0 * n_fa / n_neg, false_accepts=n_fa)
        else:
            e.update(frr=None, threshold=None, far_actual=None, false_accepts=None)
        lv.append(e)
    res["far_levels"] = lv

    # error lists
    if top_k:
        ps, pi, pj = (t.cpu().numpy() for t in (pos_s, pos_i, pos_j))
        o = np.lexsort((pj, pi, ps))[:top_k]
        res["false_rejects"] = [(int(pi[q]), int(pj[q]), float(ps[q])) for q in o]
        res["false_accepts"] = [] if fa is None else [(int(i), int(j), float(s)) for s, i, j in zip(*fa)]
    else:
        res["false_rejects"], res["false_accepts"] = [], []
    return res


# ----------------------------------------------------------------------------------------------------------------
# retrieval

def _desc_keys(S, col0=0):
    """int64 keys whose ascending order is (score descending, column ascending): exact ranking with ties by index."""
    S.add_(0.0)  # -0.0 -> +0.0 so that the two zeros tie
    bits = S.view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # monotone in the float value
    key.mul_(-(1 << 32))
    key.add_(torch.arange(col0, col0 + S.shape[1], device=S.device, dtype=torch.int64))
    return key


def retrieval(query_emb, query_pids, gallery_emb, gallery_pids, ks=(1, 5, 10), block=DEFAULT_BLOCK,
              normalize=False):
    """Ranking metrics as IRRA's evaluator computes them, in percent.

    Each query ranks the whole gallery by score (dot product, float32) descending; equal scores are ordered by
    gallery index ascending (a stable sort), so results are deterministic. A hit is any gallery item with the
    query's pid. Per query with P positives at 1-based ranks r_1 < ... < r_P:
      R@K: 100 if r_1 <= K;  AP = mean_k (k / r_k);  INP = P / r_P  (mINP: the rank of the hardest positive).
    R@K, mAP, mINP are means over queries that have at least one positive; queries without one are excluded
    and counted (n_excluded). Used both ways: text->image (queries = captions) and image->text.
    Blockwise over queries (block // n_gallery rows at a time): the rank of each positive is
    #{gallery items ordered before or at it}, counted by a batched binary search of every item among the row's
    sorted positive keys -- no full sort of the gallery, no dense Q x G matrix.
    """
    q = _emb(query_emb, "query_emb", normalize=normalize)
    dev = q.device
    g = _emb(gallery_emb, "gallery_emb", device=dev, normalize=normalize)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_emb is {q.shape[1]}-d but gallery_emb is {g.shape[1]}-d")
    n_q, n_g = q.shape[0], g.shape[0]
    qp = _ints(query_pids, "query_pids", n_q, dev)
    gp = _ints(gallery_pids, "gallery_pids", n_g, dev)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")
    if n_g >= (1 << 31):
        raise ValueError("gallery too large (>= 2^31 items)")
    rows = _rows_per_block(block, n_g)
    same = _SameId(gp)
    gT = g.t()
    hits = np.zeros(len(ks), np.int64)
    ap_sum = inp_sum = 0.0
    n_valid = 0
    for q0 in range(0, n_q, rows):
        q1 = min(n_q, q0 + rows)
        r, c, npos = same.pairs(qp[q0:q1])
        if not len(r):
            continue
        S = torch.mm(q[q0:q1], gT)
        key = _desc_keys(S)
        del S
        B = q1 - q0
        p_max = int(npos.max())
        first = torch.cumsum(npos, 0) - npos
        slot = torch.arange(len(r), device=dev) - first[r]
        pk = torch.full((B, p_max), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
        pk[r, slot] = key[r, c]
        pk = torch.sort(pk, dim=1).values
        # b = #{positives ordered before the item}; rank(k-th positive) = #{items with b <= k-1}
        b = torch.searchsorted(pk, key, right=False)
        del key
        b.add_(torch.arange(B, device=dev, dtype=torch.int64)[:, None] * (p_max + 1))
        cnt = torch.bincount(b.view(-1), minlength=B * (p_max + 1)).view(B, p_max + 1)
        del b
        ranks = torch.cumsum(cnt, 1)[:, :p_max].double()  # rank of the k-th positive (1-based), k < npos valid
        valid = npos > 0
        kk = torch.arange(1, p_max + 1, device=dev, dtype=torch.float64)
        inside = kk[None, :] <= npos[:, None]
        ap = torch.where(inside, kk[None, :] / ranks, torch.zeros((), dtype=torch.float64, device=dev)).sum(1)
        ap = ap[valid] / npos[valid]
        last = ranks[valid, npos[valid] - 1]
        inp = npos[valid] / last
        r1 = ranks[valid, 0]
        for t, k in enumerate(ks):
            hits[t] += int((r1 <= k).sum())
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
                        top_k=15, ks=(1, 5, 10), block=DEFAULT_BLOCK, normalize=False):
    """verification + text->image and image->text retrieval on the same embeddings.
    Returns {"verification": ..., "t2i": ..., "i2t": ..., "headline": flat dict (see `headline`)}."""
    img = _emb(img_emb, "img_emb", normalize=normalize)  # convert once, share between the three
    cap = _emb(cap_emb, "cap_emb", device=img.device, normalize=normalize)
    v = verification(img, cap, cap_img_index, img_pids, cap_pids, far_levels=far_levels, top_k=top_k, block=block)
    t2i = retrieval(cap, cap_pids, img, img_pids, ks=ks, block=block)
    i2t = retrieval(img, img_pids, cap, cap_pids, ks=ks, block=block)
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
            lines.append(f"\t {img_names[i]} {cap_names[j]} {s!r}")
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
