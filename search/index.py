"""Nearest-neighbour index over a collection's features (faiss, inner product = cosine on unit vectors).

    --index flat      exact search straight over the (memory-mapped) features with faiss.knn: nothing copied,
                      nothing saved
    --index ivf       IndexIVFFlat: float32 vectors in the lists (holds a second copy of the features in RAM)
    --index ivf_fp16  IndexIVFScalarQuantizer fp16: half the RAM of the features
    --index ivf_sq8   IndexIVFScalarQuantizer 8-bit: a quarter of the RAM (10M x 512 = 5.1 GB); the top
                      k x --refine candidates (default 4) are re-ranked exactly from the memory-mapped float32
                      features, because 8-bit codes alone cap recall@10 near 0.96 on tight student clusters
    --index hnsw      IndexHNSWFlat(M=32, efConstruction 200): fast queries, but its build takes ~40 min at 1M
                      on 2 cores
    --index auto      from N and --recall_target (auto_params): exact flat while one exact query scans at most
                      32M floats (~5 ms; 65k rows at D=512), else ivf_sq8 with nlist ~ 2 sqrt(N)

IVF: nlist ~ 2 sqrt(N) (2000 at 1M; at least 40 training rows per list), k-means (10 iterations) on 40 rows per
list sampled from the features. Why 2 sqrt(N) and not the textbook 4 sqrt(N): k-means costs ~ nlist^2 and the
assignment of every row ~ nlist; at 1M on 2 busy cores 4000 lists took 126 s of k-means alone and more to add,
2000 lists build in about 2 min, and the query cost this adds (lists twice as long) is paid back by probing SQ8
codes (a quarter of the bytes). Rows are added in chunks read from the memory-mapped features, so the float32
gallery is never held twice.
The search parameter (IVF nprobe, HNSW efSearch) is not a fixed ratio: at build time it is tuned to the smallest
value whose recall@10 against exact search reaches --recall_target (default 0.95) on held-out gallery rows used
as queries (their own row excluded from both answers), and the chosen value, the recall measured and the number
of tuning queries are recorded in the index sidecar. --nprobe / --ef_search override it at load.

Saved indexes: P_index.faiss + sidecar P_index.json (type, parameters, tuning, row count and fingerprint of the
features, and a hash of the index file itself); an index whose sidecar does not match the current features (grown
or rebuilt gallery) or was tuned for another recall target is stale, and one whose bytes do not match its hash is
damaged (faiss reads flipped bytes without complaint and then scores ~1e27): both are rebuilt. Loaded
memory-mapped where this faiss build supports it (IO_FLAG_MMAP_IFC / IO_FLAG_MMAP), falling back to a plain read.
"""
import hashlib
import json
import os
import time

import numpy as np

from search.collection import atomic_write_json, fingerprint, prefix_paths, _tmp, _fsync_replace

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivf_fp16", "ivf_sq8")
ANN_TYPES = ("hnsw", "ivf", "ivf_fp16", "ivf_sq8")
AUTO_FLAT_MAX_FLOATS = 1 << 25  # exact search while one query scans <= 32M floats (128 MB, ~5 ms)
DEFAULT_RECALL_TARGET = 0.95
DEFAULT_REFINE = {"ivf_sq8": 4}
MAX_REFINE = 64
KMEANS_ROWS_PER_LIST = 40
KMEANS_ITERATIONS = 10
TUNE_QUERIES = 200
ADD_CHUNK = 50_000
INDEX_VERSION = 2


def choose_index(kind, n_rows, dim=512):
    if kind not in INDEX_TYPES:
        raise ValueError(f"--index must be one of {', '.join(INDEX_TYPES)}, got {kind!r}")
    if kind == "auto":
        return "flat" if n_rows * dim <= AUTO_FLAT_MAX_FLOATS else "ivf_sq8"
    return kind


def auto_params(n_rows, dim, recall_target=DEFAULT_RECALL_TARGET):
    """What --index auto builds for N rows of D dims: {"kind", "nlist"?, "refine"?, "recall_target"}; the
    search parameter is then tuned on the data to reach recall_target (tune_search_param)."""
    kind = choose_index("auto", n_rows, dim)
    p = {"kind": kind, "recall_target": float(recall_target)}
    if kind.startswith("ivf"):
        p["nlist"] = default_nlist(n_rows)
        if kind in DEFAULT_REFINE:
            p["refine"] = DEFAULT_REFINE[kind]
    return p


def default_nlist(n):
    # ~2*sqrt(N) lists (see the module docstring), at least KMEANS_ROWS_PER_LIST training rows per list (faiss
    # warns below 39) and >= 1
    return int(max(1, min(int(2 * np.sqrt(max(n, 1))), n // KMEANS_ROWS_PER_LIST)))


def _f32(a):
    """float32 C-contiguous view of a slice of the (memory-mapped) features: no copy when it already is one."""
    return np.ascontiguousarray(a, dtype=np.float32)


class SearchIndex:
    """`search(queries [B,D], k) -> (scores [B,k'], rows [B,k'])`, k' = min(k, N); rows index the collection.
    `features` (the collection's, usually memory-mapped) serves exact flat search and the SQ8 re-ranking."""

    def __init__(self, index, kind, n, params=None, features=None):
        self.index, self.kind, self.n = index, kind, n
        self.params = params or {}
        self.features = features

    def set_search_params(self, ef_search=None, nprobe=None, refine=None):
        import faiss

        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(ef_search or self.params.get("ef_search", 128))
            self.params["ef_search"] = self.index.hnsw.efSearch
        elif self.kind.startswith("ivf"):
            ivf = faiss.extract_index_ivf(self.index)
            nl = ivf.nlist
            npb = int(nprobe or self.params.get("nprobe") or max(1, nl // 8))
            ivf.nprobe = max(1, min(npb, nl))
            self.params["nprobe"] = ivf.nprobe
        if refine is not None:
            self.params["refine"] = int(refine)

    def search(self, queries, k):
        import faiss

        q = _f32(np.atleast_2d(queries))
        k = int(min(k, self.n))
        if k < 1:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.kind == "flat":
            return faiss.knn(q, _f32(self.features), k, faiss.METRIC_INNER_PRODUCT)
        refine = int(self.params.get("refine") or 0)
        kk = min(self.n, k * refine) if refine > 1 and self.features is not None else k
        scores, rows = self.index.search(q, kk)
        if kk > k:
            scores, rows = self._rerank(q, rows, k)
        if (rows < 0).any():  # HNSW/IVF may return fewer than k hits (-1 padding): drop those columns per row
            keep = [(r >= 0) for r in rows]
            kk = min(int(m.sum()) for m in keep)
            scores = np.stack([s[m][:kk] for s, m in zip(scores, keep)])
            rows = np.stack([r[m][:kk] for r, m in zip(rows, keep)])
        return scores, rows

    def nbytes(self):
        """RAM the index itself holds (the features it re-ranks from stay in their memory-mapped file)."""
        import faiss

        if self.index is None:
            return 0
        if self.kind == "hnsw":
            h = faiss.downcast_index(self.index)
            return int(self.n * self.index.d * 4 + h.hnsw.neighbors.size() * 4 + h.hnsw.offsets.size() * 8)
        ivf = faiss.extract_index_ivf(self.index)
        # codes + one 8-byte id per row in the inverted lists, plus the centroids
        return int(self.n * (ivf.code_size + 8) + ivf.nlist * self.index.d * 4)

    def _rerank(self, q, cand, k):
        """Exact scores of the candidates from the float32 features (a few rows read per query)."""
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_r = np.full((len(q), k), -1, np.int64)
        for i, c in enumerate(cand):
            c = np.unique(c[c >= 0])  # sorted: the memory-mapped reads go forwards
            s = _f32(self.features[c]) @ q[i]
            top = np.argsort(-s, kind="stable")[:k]
            out_s[i, :len(top)], out_r[i, :len(top)] = s[top], c[top]
        return out_s, out_r


def _kmeans_sample(features, n_rows, seed):
    rng = np.random.default_rng(seed)
    n = len(features)
    if n <= n_rows:
        return _f32(features[:])
    return _f32(features[np.sort(rng.choice(n, n_rows, replace=False))])


def build_index(features, kind, hnsw_m=32, ef_construction=200, nlist=None, seed=0, refine=None):
    """Build (not tune) an index of `kind` over features [N, D] (a memmap is read in chunks, never copied whole)."""
    import faiss

    n, d = features.shape
    if kind == "flat":
        return SearchIndex(None, "flat", n, {}, features)
    if kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = ef_construction
        params = {"M": hnsw_m, "ef_construction": ef_construction}
    elif kind in ("ivf", "ivf_fp16", "ivf_sq8"):
        nl = max(1, min(int(nlist or default_nlist(n)), n))
        sample = _kmeans_sample(features, nl * KMEANS_ROWS_PER_LIST, seed)
        km = faiss.Clustering(d, nl)
        km.niter, km.seed, km.max_points_per_centroid = KMEANS_ITERATIONS, seed, KMEANS_ROWS_PER_LIST
        km.verbose = False
        km.train(sample, faiss.IndexFlatIP(d))
        cents = faiss.vector_float_to_array(km.centroids).reshape(nl, d)
        quant = faiss.IndexFlatIP(d)  # exact coarse search: 2000 x 512 is ~0.1 ms, and BLAS-batched when adding
        quant.add(cents)
        if kind == "ivf":
            idx = faiss.IndexIVFFlat(quant, d, nl, faiss.METRIC_INNER_PRODUCT)
        else:
            qt = faiss.ScalarQuantizer.QT_fp16 if kind == "ivf_fp16" else faiss.ScalarQuantizer.QT_8bit
            idx = faiss.IndexIVFScalarQuantizer(quant, d, nl, qt, faiss.METRIC_INNER_PRODUCT)
        # the quantizer already holds the centroids, so train() only fits the scalar quantizer on the residuals
        idx.train(sample[:50_000])
        del sample
        params = {"nlist": nl}
        r = DEFAULT_REFINE.get(kind) if refine is None else refine
        if r:
            params["refine"] = int(r)
    else:
        raise ValueError(f"unknown index type {kind!r}")
    for s in range(0, n, ADD_CHUNK):  # chunked add from the memmap: one chunk of float32 in RAM at a time
        idx.add(_f32(features[s:s + ADD_CHUNK]))
    return SearchIndex(idx, kind, n, params, features)


def exact_neighbours(features, queries, k, chunk=200_000):
    """Exact top-k (scores, rows) of queries over features, streamed in chunks of the memmap."""
    import faiss

    q = _f32(queries)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_r = np.zeros((len(q), 0), np.int64)
    for s in range(0, len(features), chunk):
        cs, cr = faiss.knn(q, _f32(features[s:s + chunk]), min(k, len(features) - s), faiss.METRIC_INNER_PRODUCT)
        best_s, best_r = np.concatenate([best_s, cs], 1), np.concatenate([best_r, cr + s], 1)
        o = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(best_s, o, 1), np.take_along_axis(best_r, o, 1)
    return best_s, best_r


def recall_at(found, truth, k=10):
    """Mean |found_i ∩ truth_i| / |truth_i| over queries (rows; -1 padding ignored)."""
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / max(1, len(t[:k]))
                          for f, t in zip(found, truth)]))


def tune_search_param(sidx, target=DEFAULT_RECALL_TARGET, n_queries=TUNE_QUERIES, k=10, seed=1, cache=None):
    """Smallest nprobe (IVF) / efSearch (HNSW) whose recall@k against exact search reaches `target`, measured on
    n_queries held-out gallery rows used as queries, each one's own row removed from both answers. Sets it and
    records {"param", "value", "recall_at_10", "recall_target", "queries"} in sidx.params["tuning"].
    `cache` (a dict) keeps the exact answers for another index over the same features (bench/search_speed.py)."""
    import faiss

    feats = sidx.features
    n = sidx.n
    if sidx.kind not in ANN_TYPES or n <= k + 1:
        return None
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, min(n_queries, n), replace=False))
    q = _f32(feats[rows])
    key = (n, len(rows), k, seed)
    if cache is not None and key in cache:
        truth = cache[key]
    else:
        _, truth = exact_neighbours(feats, q, k + 1)
        if cache is not None:
            cache[key] = truth

    def drop_self(r):
        return np.stack([np.concatenate([x[x != own], [-1] * (x == own).sum()])[:k] for x, own in zip(r, rows)])

    truth = drop_self(truth)
    if sidx.kind == "hnsw":
        name, hi = "ef_search", 4096
        values = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    else:
        name, hi = "nprobe", faiss.extract_index_ivf(sidx.index).nlist
        values = sorted({min(hi, 1 << i) for i in range(0, 31) if (1 << (i - 1) if i else 0) < hi})

    def measure(v):
        sidx.set_search_params(**{name: v})
        return recall_at(drop_self(sidx.search(q, k + 1)[1]), truth, k)

    while True:
        lo_v, chosen, rec = None, values[-1], None
        for v in values:
            r = measure(v)
            if r >= target:
                chosen, rec = v, r
                break
            lo_v = v
        refine = int(sidx.params.get("refine") or 0)
        if rec is not None or not 1 < refine < MAX_REFINE:
            break
        # the codes cannot rank the true neighbours into the top k x refine (a very tight cone of embeddings):
        # re-rank a longer list from the float32 features and search again
        sidx.params["refine"] = refine * 2
    if rec is None:  # not reachable even at the largest value: keep the largest
        rec = r
    elif lo_v is not None:  # bisect between the last miss and the first hit
        lo, hi_v = lo_v, chosen
        while hi_v - lo > max(1, hi_v // 8):
            mid = (lo + hi_v) // 2
            r = measure(mid)
            if r >= target:
                hi_v, rec = mid, r
            else:
                lo = mid
        chosen = hi_v
    sidx.set_search_params(**{name: chosen})
    sidx.params[name] = chosen
    sidx.params["tuning"] = {"param": name, "value": int(chosen), "recall_at_10": round(rec, 4),
                             "recall_target": float(target), "queries": int(len(rows))}
    return sidx.params["tuning"]


def _read_mmap(path):
    import faiss

    flags = []
    if hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        flags.append(faiss.IO_FLAG_MMAP_IFC | getattr(faiss, "IO_FLAG_MMAP", 0))
    if hasattr(faiss, "IO_FLAG_MMAP"):
        flags.append(faiss.IO_FLAG_MMAP)
    flags.append(0)
    err = None
    for fl in flags:
        try:
            return faiss.read_index(path, fl)
        except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError for unsupported flag combos
            err = e
    raise err


def file_hash(path, chunk=1 << 20):
    """blake2b of a file's bytes (the saved index's own fingerprint)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def save_index(sidx, prefix, features_fp):
    import faiss

    p = prefix_paths(prefix)
    tmp = _tmp(p["index"])
    try:
        faiss.write_index(sidx.index, tmp)
        index_hash = file_hash(tmp)
        _fsync_replace(tmp, p["index"])
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    meta = {"version": INDEX_VERSION, "kind": sidx.kind, "rows": sidx.n, "dim": sidx.index.d,
            "features_fingerprint": features_fp, "index_hash": index_hash, "params": dict(sidx.params)}
    atomic_write_json(p["index_meta"], meta)  # written last: an index without a matching sidecar is stale


def read_index_meta(prefix):
    """The sidecar P_index.json as a dict, or None."""
    try:
        with open(prefix_paths(prefix)["index_meta"], encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def load_index(prefix, kind, features_fp, n_rows, dim, recall_target=None, features=None):
    """The saved index if it is fresh (same type, rows, dim, features fingerprint and, when given, the recall
    target it was tuned for) and intact (its file hash matches the sidecar), else None."""
    meta = read_index_meta(prefix)
    if not (meta and meta.get("version") == INDEX_VERSION and meta.get("kind") == kind
            and meta.get("rows") == n_rows and meta.get("dim") == dim
            and meta.get("features_fingerprint") == features_fp):
        return None
    params = meta.get("params") if isinstance(meta.get("params"), dict) else {}
    tuned = (params.get("tuning") or {}).get("recall_target") if isinstance(params.get("tuning"), dict) else None
    if recall_target is not None and tuned != float(recall_target):
        return None
    try:
        if file_hash(prefix_paths(prefix)["index"]) != meta.get("index_hash"):  # damaged (or an older sidecar)
            return None
    except OSError:
        return None
    try:
        idx = _read_mmap(prefix_paths(prefix)["index"])
    except Exception:  # noqa: BLE001 - a torn/corrupt index file is just rebuilt
        return None
    if idx.ntotal != n_rows or idx.d != dim:
        return None
    return SearchIndex(idx, kind, n_rows, dict(params), features)


def set_search_threads(n=None):
    """faiss OpenMP threads used by searches. Default 1: one query over a gallery of up to a few hundred MB is
    memory-bound, and OpenMP fork/join costs more than it saves (measured 0.5 ms with 1 thread vs 40+ ms with 2 on a
    busy 2-core machine for 10k x 512); a server gets parallelism from concurrent requests. Raise it for huge
    exact (flat) galleries."""
    import faiss

    faiss.omp_set_num_threads(int(n or 1))


def get_index(features, prefix=None, kind="auto", save=True, ef_search=None, nprobe=None, log=None,
              features_fp=None, search_threads=None, recall_target=None, refine=None):
    """Load a fresh saved index for `prefix` or build one, tune its search parameter to `recall_target`
    (default 0.95) and save it when `save` (ANN types only). Building uses every core; afterwards faiss is set to
    `search_threads` (set_search_threads). --nprobe / --ef_search / refine override the saved values.
    Returns a SearchIndex with search parameters set."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    n, d = features.shape
    target = float(DEFAULT_RECALL_TARGET if recall_target is None else recall_target)
    ap = auto_params(n, d, target) if kind == "auto" else None
    kind = ap["kind"] if ap else choose_index(kind, n, d)
    sidx = None
    if kind != "flat" and n:
        if prefix is not None:
            features_fp = features_fp or fingerprint(features)
            sidx = load_index(prefix, kind, features_fp, n, d, target, features)
        if sidx is None:
            t = time.perf_counter()
            sidx = build_index(features, kind, nlist=ap.get("nlist") if ap else None)
            tb = time.perf_counter() - t
            tune = tune_search_param(sidx, target)
            msg = f"built {kind} index over {n} rows in {tb:.1f} s"
            if tune:
                msg += (f"; {tune['param']} {tune['value']}"
                        + (f", refine x{sidx.params['refine']}" if sidx.params.get("refine") else "")
                        + f" tuned in {time.perf_counter() - t - tb:.1f} s for recall@10 {tune['recall_at_10']:.3f}"
                        f" (target {target}{'' if tune['recall_at_10'] >= target else ', NOT reached'}, "
                        f"{tune['queries']} gallery rows as queries)")
            if log:
                log(msg)
            if save and prefix is not None:
                try:
                    save_index(sidx, prefix, features_fp)
                except OSError as e:  # a read-only gallery still searches, just rebuilds next time
                    if log:
                        log(f"note: could not save the index next to the features ({e.strerror}); kept in memory")
    if sidx is None:
        sidx = build_index(features, "flat")
    sidx.set_search_params(ef_search, nprobe, refine)
    set_search_threads(search_threads)
    return sidx
