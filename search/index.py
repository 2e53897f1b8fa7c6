"""Nearest-neighbour index over a collection's features (faiss, inner product = cosine on unit vectors).

    --index flat   exact IndexFlatIP, built in memory from the features at load (it would only duplicate
                   P_features.npy on disk, so it is never saved)
    --index hnsw   IndexHNSWFlat(M=32, METRIC_INNER_PRODUCT), efSearch 128 by default (--ef_search)
    --index ivf    IndexIVFFlat(nlist ~ 4*sqrt(N)), nprobe = nlist/8 by default (--nprobe)
    --index auto   flat below 100,000 rows (exact search of 100k x 1152 floats takes ~10 ms), hnsw above

HNSW / IVF indexes are saved atomically as P_index.faiss with a sidecar P_index.json recording the type and
parameters, the row count and fingerprint of the features they were built from, and a hash of the index file
itself; an index whose sidecar does not match the current features (grown or rebuilt gallery) is stale, and one
whose bytes do not match its hash is damaged (faiss reads flipped bytes without complaint and then scores ~1e27):
both are rebuilt. Saved indexes are loaded
memory-mapped where this faiss build supports it (IO_FLAG_MMAP_IFC / IO_FLAG_MMAP), falling back to a plain read.
"""
import hashlib
import json
import os
import time

import numpy as np

from search.collection import atomic_write_json, fingerprint, prefix_paths, _tmp, _fsync_replace

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
AUTO_HNSW_MIN_ROWS = 100_000
INDEX_VERSION = 1


def choose_index(kind, n_rows):
    if kind not in INDEX_TYPES:
        raise ValueError(f"--index must be one of {', '.join(INDEX_TYPES)}, got {kind!r}")
    if kind == "auto":
        return "hnsw" if n_rows >= AUTO_HNSW_MIN_ROWS else "flat"
    return kind


def default_nlist(n):
    # ~4*sqrt(N) lists, but at least 39 training points per list (faiss warns below that) and >= 1
    return int(max(1, min(int(4 * np.sqrt(max(n, 1))), n // 39)))


class SearchIndex:
    """`search(queries [B,D], k) -> (scores [B,k'], rows [B,k'])`, k' = min(k, N); rows index the collection."""

    def __init__(self, index, kind, n, params=None):
        self.index, self.kind, self.n = index, kind, n
        self.params = params or {}

    def set_search_params(self, ef_search=None, nprobe=None):
        import faiss

        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(ef_search or self.params.get("ef_search", 128))
            self.params["ef_search"] = self.index.hnsw.efSearch
        elif self.kind == "ivf":
            nl = faiss.extract_index_ivf(self.index).nlist
            npb = int(nprobe or self.params.get("nprobe") or max(1, nl // 8))
            self.index.nprobe = max(1, min(npb, nl))
            self.params["nprobe"] = self.index.nprobe

    def search(self, queries, k):
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = int(min(k, self.n))
        if k < 1:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        scores, rows = self.index.search(q, k)
        if (rows < 0).any():  # HNSW/IVF may return fewer than k hits (-1 padding): drop those columns per row
            keep = [(r >= 0) for r in rows]
            kk = min(int(m.sum()) for m in keep)
            scores = np.stack([s[m][:kk] for s, m in zip(scores, keep)])
            rows = np.stack([r[m][:kk] for r, m in zip(rows, keep)])
        return scores, rows


def build_index(features, kind, hnsw_m=32, ef_construction=200, nlist=None, seed=0):
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    n, d = x.shape
    if kind == "flat":
        idx = faiss.IndexFlatIP(d)
        params = {}
    elif kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = ef_construction
        params = {"M": hnsw_m, "ef_construction": ef_construction}
    elif kind == "ivf":
        nl = int(nlist or default_nlist(n))
        nl = max(1, min(nl, n))
        quant = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quant, d, nl, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x if n <= nl * 256 else x[np.sort(rng.choice(n, nl * 256, replace=False))]
        idx.cp.seed = seed
        idx.train(sample)
        params = {"nlist": nl}
    else:
        raise ValueError(f"unknown index type {kind!r}")
    if n:
        for s in range(0, n, 100_000):  # chunked add keeps the temporary copies small
            idx.add(x[s:s + 100_000])
    return SearchIndex(idx, kind, n, params)


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
            "features_fingerprint": features_fp, "index_hash": index_hash,
            "params": {k: v for k, v in sidx.params.items() if k not in ("ef_search", "nprobe")}}
    atomic_write_json(p["index_meta"], meta)  # written last: an index without a matching sidecar is stale


def load_index(prefix, kind, features_fp, n_rows, dim):
    """The saved index if it is fresh (same type, rows, dim and features fingerprint) and intact (its file hash
    matches the sidecar), else None."""
    p = prefix_paths(prefix)
    try:
        with open(p["index_meta"], encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(meta, dict) and meta.get("version") == INDEX_VERSION and meta.get("kind") == kind
            and meta.get("rows") == n_rows and meta.get("dim") == dim
            and meta.get("features_fingerprint") == features_fp):
        return None
    try:
        if file_hash(p["index"]) != meta.get("index_hash"):  # damaged (or an older sidecar without the hash)
            return None
    except OSError:
        return None
    try:
        idx = _read_mmap(p["index"])
    except Exception:  # noqa: BLE001 - a torn/corrupt index file is just rebuilt
        return None
    if idx.ntotal != n_rows or idx.d != dim:
        return None
    return SearchIndex(idx, kind, n_rows, dict(meta.get("params") or {}))


def set_search_threads(n=None):
    """faiss OpenMP threads used by searches. Default 1: one query over a gallery of up to a few hundred MB is
    memory-bound, and OpenMP fork/join costs more than it saves (measured 0.5 ms with 1 thread vs 40+ ms with 2 on a
    busy 2-core machine for 10k x 512); a server gets parallelism from concurrent requests. Raise it for huge
    exact (flat) galleries."""
    import faiss

    faiss.omp_set_num_threads(int(n or 1))


def get_index(features, prefix=None, kind="auto", save=True, ef_search=None, nprobe=None, log=None,
              features_fp=None, search_threads=None):
    """Load a fresh saved index for `prefix` or build one (and save it when `save` and the type is saved).
    Building uses every core; afterwards faiss is set to `search_threads` (set_search_threads).
    Returns a SearchIndex with search parameters set."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    n, d = features.shape
    kind = choose_index(kind, n)
    sidx = None
    if kind != "flat" and prefix is not None and n:
        features_fp = features_fp or fingerprint(features)
        sidx = load_index(prefix, kind, features_fp, n, d)
        if sidx is None:
            t = time.perf_counter()
            sidx = build_index(features, kind)
            if log:
                log(f"built {kind} index over {n} rows in {time.perf_counter() - t:.1f} s")
            if save:
                try:
                    save_index(sidx, prefix, features_fp)
                except OSError as e:  # a read-only gallery still searches, just rebuilds next time
                    if log:
                        log(f"note: could not save the index next to the features ({e.strerror}); kept in memory")
    if sidx is None:
        sidx = build_index(features, "flat" if kind == "flat" or n == 0 else kind)
    sidx.set_search_params(ef_search, nprobe)
    set_search_threads(search_threads)
    return sidx
