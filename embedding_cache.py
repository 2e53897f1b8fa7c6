"""The teacher embedding cache (DESIGN §3): the only module that reads or writes it.

Layout of an --embedding_path directory:
  manifest.json              teacher, kind, dim, dataset sha256, row counts, preprocessing, format version
  <field>.npy                float16 [N, D], L2-normalised, row order = dataset order (np.lib.format.open_memmap)
  <field>.done.npy           bool [N]: rows that hold a teacher embedding (resume + `has_embedding` in training);
                             updated in place per batch (only the batch's bytes), never rewritten whole
  <field>.done.rank<r>.npy   per-rank done masks of a torchrun extraction, folded into <field>.done.npy at its end
for the fields image, caption, attributes, prompt_caption.

Opening checks what it can cheaply: every .npy's byte size against its header and the manifest (a truncated file
is refused by readers; a writer resuming into it keeps the intact rows, marks the lost ones not done and says
so, so they are recomputed - it is never grown with zeros behind done marks), and one pass over the rows marked
done (all of them up to 256 MiB per field, evenly spread blocks beyond): NaN/inf, all-zero or unnormalised rows are
treated as not done, with one warning line (a writer saves that, so a resume recomputes them).

It is written by tools/extract_label.py and read (memory-mapped) by training and evaluation:
  python tools/extract_label.py --data SYNTH-PEDES/synthpedes-dataset.json --embedding_path embeddings
  python embedding_cache.py embeddings [--data SYNTH-PEDES/synthpedes-dataset.json]   # print what a cache holds
"""
import argparse
import json
import os
import sys

import numpy as np

FORMAT_VERSION = 1
FIELDS = ("image", "caption", "attributes", "prompt_caption")
DTYPE = "float16"
# what must agree for a cache to be resumed into (the dataset path may move, the bytes may not)
MATCH_KEYS = ("format_version", "teacher", "teacher_kind", "dim", "dtype", "normalized", "multilingual",
              "dataset_sha256", "counts", "preprocessing")


ROW_CHECK_BYTES = 256 << 20  # per field: rows checked in full up to this size, evenly spread blocks beyond
_BLOCK_ROWS = 65536


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def npy_layout(path):
    """(data offset, shape, dtype) from a .npy header; ValueError for a file too short to hold one."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
        return f.tell(), shape, dtype


class CacheMismatchError(ValueError):
    """A cache that belongs to another dataset/teacher, or is damaged; the message is one line."""


def _atomic_save(path, arr):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)  # a reader (or a kill -9) sees the old mask or the new one, never half of one


def _atomic_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


class _RowFile:
    """In-place writer of rows of a 1-d/2-d .npy: os.pwrite of the changed byte ranges only, so a batch costs the
    same at 10k rows and at 12M (a whole-mask rewrite per batch made extraction quadratic in N). pwrite rather than a
    shared mmap: on a network filesystem written by several nodes, a dirty page would carry back a neighbour rank's
    stale rows; byte-range writes never touch another rank's rows."""

    def __init__(self, path, n, row_bytes, dtype):
        self.path, self.n, self.row_bytes = path, int(n), int(row_bytes)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dt = read(f)
            self.offset = f.tell()
        if shape[0] != self.n or fortran or dt != np.dtype(dtype):
            raise CacheMismatchError(f"{path}: is {dt}{list(shape)}, expected {np.dtype(dtype)}[{self.n}, ...]")
        self.fd = os.open(path, os.O_RDWR)

    def write(self, rows, values):
        """rows int64 sorted ascending, values [len(rows), ...] C-contiguous: one pwrite per run of adjacent rows."""
        buf = memoryview(np.ascontiguousarray(values)).cast("B")
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(rows)]])):
            os.pwrite(self.fd, buf[a * self.row_bytes:b * self.row_bytes], self.offset + int(rows[a]) * self.row_bytes)

    def sync(self):
        os.fdatasync(self.fd)  # the rows reach the disk before the done mask that vouches for them

    def close(self):
        os.close(self.fd)


def _short(v):
    s = json.dumps(v, ensure_ascii=False, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def mismatch(old, new, keys=MATCH_KEYS):
    """First key (of `keys` present in `new`) on which two manifests differ -> (key, old, new), else None."""
    for k in keys:
        if k in new and old.get(k) != new[k]:
            return k, old.get(k), new[k]
    return None


def read_manifest(path):
    """manifest.json of a cache directory, or None when there is none."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        return None
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CacheMismatchError(f"{path}: unreadable manifest.json ({type(e).__name__}: {e})") from None
    version = m.get("format_version") if isinstance(m, dict) else None
    if version != FORMAT_VERSION:
        raise CacheMismatchError(f"{path}: manifest format_version {version} is not {FORMAT_VERSION}; "
                                 f"re-extract it with tools/extract_label.py")
    return m


def verify(path, expected):
    """Refuse (CacheMismatchError) an existing cache whose manifest disagrees with `expected` on any MATCH_KEYS
    it names. No cache at `path` passes. Lets extract_label fail fast, before loading a big teacher."""
    m = read_manifest(path)
    if m is None:
        return
    bad = mismatch(m, expected)
    if bad:
        k, old, new = bad
        raise CacheMismatchError(f"{path}: cache was built for {k} {_short(old)}, not {_short(new)} "
                                 f"(use another --embedding_path or delete it)")


class EmbeddingCache:
    """Memory-mapped view of a cache directory. Pickles without its memmaps (DataLoader workers reopen lazily).

    mode "r": read-only. mode "r+": writer; `shard` = the torchrun rank whose done-mask file it writes
    (None = the main <field>.done.npy). Readers see the union of the main mask and any rank shards left behind.
    """

    def __init__(self, path, manifest, mode="r", shard=None):
        self.path, self.manifest, self.mode, self.shard = str(path), manifest, mode, shard
        self._arrays, self._done, self._writers = {}, {}, {}
        self._bad = {}  # field -> rows marked done whose values are unusable (kept across pickling: workers too)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, manifest, counts, dim, shard=None):
        """New cache at `path` (zero rows, nothing done), or the existing one re-opened for resume when its
        manifest matches; CacheMismatchError otherwise. `manifest`: teacher/dataset keys (docs/INTERFACES.md)."""
        counts = {f: int(counts.get(f, 0)) for f in FIELDS}
        m = dict(manifest, format_version=FORMAT_VERSION, dim=int(dim), dtype=DTYPE, normalized=True, counts=counts)
        verify(path, m)
        if read_manifest(path) is not None:
            return cls.open(path, mode="r+", shard=shard)
        os.makedirs(path, exist_ok=True)
        for f in FIELDS:
            fpath = os.path.join(path, f"{f}.npy")
            tmp = f"{fpath}.tmp{os.getpid()}.npy"
            # sparse file: creating a multi-GB cache costs nothing until rows are written
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(counts[f], int(dim)))
            del arr
            os.replace(tmp, fpath)
            _atomic_save(os.path.join(path, f"{f}.done.npy"), np.zeros(counts[f], dtype=bool))
            for s in cls._shard_files(path, f):  # leftovers of an older cache in this folder
                os.remove(s)
        _atomic_json(os.path.join(path, "manifest.json"), m)  # written last: a manifest means the files exist
        return cls.open(path, mode="r+", shard=shard)

    @classmethod
    def open(cls, path, data_json=None, counts=None, mode="r", shard=None, check_rows=True):
        """Open a cache. With `data_json` (and/or `counts` {field: rows}) refuse one built for other data."""
        path = str(path)
        m = read_manifest(path)
        if m is None:
            raise CacheMismatchError(f"{path}: no teacher cache here (no manifest.json); "
                                     f"build it with tools/extract_label.py")
        if data_json is not None:
            from data import dataset_hash
            try:
                h = dataset_hash(data_json)
            except OSError as e:
                raise CacheMismatchError(f"{data_json}: cannot read ({e})") from None
            if h != m.get("dataset_sha256"):
                raise CacheMismatchError(f"{path}: cache was built for {m.get('dataset')} "
                                         f"(sha256 {str(m.get('dataset_sha256'))[:12]}), not {data_json} "
                                         f"(sha256 {h[:12]}); re-run tools/extract_label.py")
        if counts is not None:
            for f, n in counts.items():
                if m["counts"].get(f) != int(n):
                    raise CacheMismatchError(f"{path}: cache was built for {m['counts'].get(f)} {f} rows, not {n}; "
                                             f"re-run tools/extract_label.py")
        cache = cls(path, m, mode, shard)
        for f in FIELDS:  # a damaged cache fails here with one line, not later inside a worker
            cache._check_size(f)
            a = cache.array(f)
            if a.shape != (m["counts"][f], m["dim"]) or a.dtype != np.float16:
                raise CacheMismatchError(f"{path}: {f}.npy is {a.dtype}{list(a.shape)}, the manifest says "
                                         f"float16[{m['counts'][f]}, {m['dim']}]; re-run tools/extract_label.py")
        if check_rows:
            cache.check_rows()
        return cache

    # -- integrity --------------------------------------------------------------------------------------------------
    def _check_size(self, field):
        """The file must hold exactly header + N*D float16 values. np.memmap in r+ mode would silently grow a
        truncated file with zeros (whose rows stay marked done): refuse it, or (writer) repair it visibly."""
        fpath = os.path.join(self.path, f"{field}.npy")
        n, d = int(self.manifest["counts"][field]), int(self.manifest["dim"])
        try:
            size = os.path.getsize(fpath)
        except OSError as e:
            raise CacheMismatchError(f"{self.path}: cannot open {field}.npy ({e.strerror})") from None
        try:
            offset, shape, dtype = npy_layout(fpath)
        except (OSError, ValueError, SyntaxError):
            offset, shape, dtype = None, None, None
        if shape is not None and (tuple(shape) != (n, d) or dtype != np.float16):
            return  # wrong shape/dtype: open() reports it
        want = None if offset is None else offset + n * d * 2
        if want is not None and size == want:
            return
        what = (f"{field}.npy is {size} bytes, its header and the manifest need {want}" if want is not None
                else f"{field}.npy has no readable header ({size} bytes)")
        if self.mode != "r+" or (want is not None and size > want):
            raise CacheMismatchError(f"{self.path}: {what} (truncated or damaged); re-run tools/extract_label.py "
                                     f"on it to recompute the lost rows")
        self._repair(field, fpath, offset, size, n, d, what)

    def _repair(self, field, fpath, offset, size, n, d, what):
        """Writer only: rewrite a truncated field at full size, keep its intact rows, mark the others not done."""
        keep = 0 if offset is None else max(0, min(n, (size - offset) // (2 * d)))
        tmp = f"{fpath}.tmp{os.getpid()}.npy"
        new = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
        if keep:
            old = np.memmap(fpath, dtype=np.float16, mode="r", offset=offset, shape=(keep, d))
            for s in range(0, keep, _BLOCK_ROWS):
                e = min(keep, s + _BLOCK_ROWS)
                new[s:e] = old[s:e]
            del old
        new.flush()
        del new
        done = self._read_done(field)
        lost = int(done[keep:].sum())
        done[keep:] = False
        _atomic_save(os.path.join(self.path, f"{field}.done.npy"), done)  # masks first: never done without data
        for s in self._shard_files(self.path, field):
            os.remove(s)
        os.replace(tmp, fpath)
        self._done.pop(field, None)
        _warn(f"{self.path}: {what}; kept its first {keep} rows, {lost} rows marked done were lost and are "
              f"marked not done (they will be recomputed)")

    def check_rows(self):
        """One pass over the rows marked done: NaN/inf, all-zero or unnormalised ones count as not done.
        -> {field: number of such rows}. A writer saves the corrected mask, so a resume recomputes them."""
        counts = {}
        for f in FIELDS:
            a, done = self.array(f), self._read_done(f)
            n, d = a.shape
            if not n or not done.any():
                continue
            starts = list(range(0, n, _BLOCK_ROWS))
            budget = max(1, ROW_CHECK_BYTES // max(1, _BLOCK_ROWS * d * 2))
            sampled = len(starts) > budget
            if sampled:  # evenly spread blocks: catches a damaged region, bounded time on huge caches
                starts = [starts[int(i)] for i in np.linspace(0, len(starts) - 1, budget)]
            bad = []
            for s in starts:
                m = done[s:s + _BLOCK_ROWS]
                if not m.any():
                    continue
                blk = np.asarray(a[s:s + _BLOCK_ROWS], dtype=np.float32)
                with np.errstate(over="ignore", invalid="ignore"):
                    norm = np.sqrt((blk * blk).sum(axis=1))
                ok = np.isfinite(norm) & (np.abs(norm - 1.0) < 0.01)  # rows are stored L2-normalised
                bad.append(s + np.flatnonzero(m & ~ok))
            bad = np.concatenate(bad) if bad else np.zeros(0, np.int64)
            if len(bad):
                self._bad[f] = bad
                self._done.pop(f, None)
                counts[f] = len(bad)
                if self.mode == "r+" and self.shard in (None, 0):  # rank 0 opens first, before the others
                    _atomic_save(os.path.join(self.path, f"{f}.done.npy"), self.done(f))
        if counts:
            what = ", ".join(f"{k} {v}" for k, v in counts.items())
            _warn(f"{self.path}: rows marked done hold NaN/inf, zero or unnormalised values ({what}); they are "
                  f"treated as not done" + (" and will be recomputed" if self.mode == "r+" else
                                             " - re-run tools/extract_label.py to recompute them"))
        return counts

    @staticmethod
    def _shard_files(path, field):
        pre = f"{field}.done.rank"
        return sorted(os.path.join(path, n) for n in os.listdir(path) if n.startswith(pre) and n.endswith(".npy"))

    # -- reading --------------------------------------------------------------------------------------------------
    @property
    def dim(self):
        return int(self.manifest["dim"])

    @property
    def fields(self):
        return FIELDS

    @property
    def logit_scale(self):
        return self.manifest.get("logit_scale")

    @property
    def logit_bias(self):
        return self.manifest.get("logit_bias")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"], state["_done"], state["_writers"] = {}, {}, {}  # a memmap would pickle as a full copy
        return state

    def array(self, field):
        """float16 [N, D] memmap of one field (rows that are not done are zeros)."""
        if field not in FIELDS:
            raise KeyError(f"unknown cache field {field!r}; fields are {FIELDS}")
        if field not in self._arrays:
            try:
                self._arrays[field] = np.load(os.path.join(self.path, f"{field}.npy"), mmap_mode=self.mode,
                                              allow_pickle=False)
            except (OSError, ValueError) as e:
                raise CacheMismatchError(f"{self.path}: cannot open {field}.npy ({e})") from None
        return self._arrays[field]

    def _read_done(self, field):
        n = self.manifest["counts"][field]
        done = np.zeros(n, dtype=bool)
        main = os.path.join(self.path, f"{field}.done.npy")
        if not os.path.isfile(main):
            if self.mode != "r+":
                raise CacheMismatchError(f"{self.path}: {field}.done.npy is missing, so which rows hold a teacher "
                                         f"embedding is unknown; re-run tools/extract_label.py on this cache")
            _warn(f"{self.path}: {field}.done.npy is missing; every {field} row is treated as not done and recomputed")
        for p in [main] + self._shard_files(self.path, field):
            try:
                d = np.load(p, allow_pickle=False)
            except FileNotFoundError:
                continue  # a shard folded in and removed by rank 0 while we listed them
            except (OSError, ValueError) as e:
                raise CacheMismatchError(f"{self.path}: cannot read {os.path.basename(p)} ({e})") from None
            if d.shape != (n,) or d.dtype != bool:
                raise CacheMismatchError(f"{self.path}: {os.path.basename(p)} is {d.dtype}{list(d.shape)}, "
                                         f"expected bool[{n}]")
            done |= d
        return done

    def done(self, field):
        """bool [N]: rows of `field` that hold a teacher embedding."""
        if field not in FIELDS:
            raise KeyError(f"unknown cache field {field!r}; fields are {FIELDS}")
        if field not in self._done:
            done = self._read_done(field)
            if field in self._bad:
                done[self._bad[field]] = False
            self._done[field] = done
        return self._done[field]

    # -- writing --------------------------------------------------------------------------------------------------
    def _done_path(self, field):
        name = f"{field}.done.npy" if self.shard is None else f"{field}.done.rank{self.shard}.npy"
        return os.path.join(self.path, name)

    def _writer(self, field):
        """(data rows, done-mask bytes) writers of `field`; this shard's mask file is created on first use."""
        if field not in self._writers:
            n, dpath = self.manifest["counts"][field], self._done_path(field)
            if not os.path.exists(dpath):
                _atomic_save(dpath, np.zeros(n, dtype=bool))
            self._writers[field] = (_RowFile(os.path.join(self.path, f"{field}.npy"), n, 2 * self.dim, np.float16),
                                    _RowFile(dpath, n, 1, bool))
        return self._writers[field]

    def write(self, field, rows, emb):
        """Store embeddings of `rows`: L2-normalise, write them in place, sync them to disk, then set their bytes
        of the done mask in place, so an interruption (even kill -9) never leaves a row marked done without its
        data, and a batch writes O(batch) bytes whatever N is."""
        if self.mode != "r+":
            raise PermissionError(f"{self.path}: cache opened read-only")
        rows = np.asarray(rows, dtype=np.int64)
        emb = np.asarray(emb, dtype=np.float32)
        if emb.shape != (len(rows), self.dim):
            raise ValueError(f"{field}: got embeddings {list(emb.shape)} for {len(rows)} rows of dim {self.dim}")
        if len(rows) == 0:
            return
        norm = np.linalg.norm(emb, axis=1, keepdims=True)
        if not np.all(np.isfinite(norm)) or np.any(norm == 0):
            raise ValueError(f"{field}: teacher returned a zero or non-finite embedding")
        n = self.manifest["counts"][field]
        if rows.min() < 0 or rows.max() >= n:
            raise ValueError(f"{field}: rows outside 0..{n - 1}")
        order = np.argsort(rows, kind="stable")
        rows, emb = rows[order], (emb / norm).astype(np.float16)[order]
        data_file, done_file = self._writer(field)
        data_file.write(rows, emb)
        data_file.sync()
        done = self.done(field)
        done[rows] = True
        done_file.write(rows, np.ones(len(rows), dtype=bool))
        if field in self._bad:  # rewritten rows are good again, also if the mask is read anew
            self._bad[field] = np.setdiff1d(self._bad[field], rows)

    def close(self):
        """Release the writers' file descriptors (also done when the object is garbage-collected)."""
        for w in self._writers.values():
            for f in w:
                f.close()
        self._writers = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def merge_done(self):
        """Fold the per-rank done masks into <field>.done.npy and remove them (rank 0, after all ranks finished).
        Safe to interrupt: the main mask is replaced before any shard goes, and shards are subsets of it."""
        self.close()  # this rank's shard writer points at a file about to be folded in and removed
        for f in FIELDS:
            shards = self._shard_files(self.path, f)
            if not shards:
                continue
            done = self._read_done(f)
            _atomic_save(os.path.join(self.path, f"{f}.done.npy"), done)
            for s in shards:
                os.remove(s)
            self._done[f] = done


def summary(cache, eligible=None):
    """`cache: DIR  image 800/800  caption 2400/2400 ...  dim 384 float16` (eligible rows per field, default N)."""
    parts = []
    for f in FIELDS:
        n = cache.manifest["counts"][f] if eligible is None else eligible[f]
        parts.append(f"{f} {int(cache.done(f).sum())}/{n}")
    return f"cache: {cache.path}  " + "  ".join(parts) + f"  dim {cache.dim} {DTYPE}"


def main():
    p = argparse.ArgumentParser("print what a teacher cache holds")
    p.add_argument("path")
    p.add_argument("--data", default=None, help="also check that the cache was built for this dataset JSON")
    args = p.parse_args()
    try:
        cache = EmbeddingCache.open(args.path, data_json=args.data)
    except CacheMismatchError as e:
        from cli import fail
        fail(e)
    m = cache.manifest
    print(f"teacher {m['teacher']} ({m['teacher_kind']}, multilingual {m['multilingual']}), "
          f"dataset {m['dataset']} sha256 {m['dataset_sha256'][:12]}")
    print(summary(cache))


if __name__ == "__main__":
    main()
