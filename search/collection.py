r"""The gallery collection format (DESIGN §9) — the only module that reads or writes it.

Files of a collection with prefix P (e.g. `collection/person`):
    P_features.npy     float32 [N, D], rows L2-normalised
    P_metadata.json    {"format_version": 1,
                        "model": {...},          # what embedded the rows; see below
                        "dim": D, "rows": N,
                        "features_fingerprint": "...",   # fingerprint(features) at write time
                        "items": [{"image": "<path relative to the image root, '/' separators>",
                                   "bbox": [x1, y1, x2, y2] | null,      # null = the whole image
                                   "source": "image" | "boxes" | "coco",
                                   "score": float?,                      # detector score (COCO input)
                                   "bbox_src": [..]?}, ...]}              # the box as given, when clipping changed it
    P_index.faiss + P_index.json    optional ANN index (search/index.py)
    P_partial/chunk_NNNNNN.{npy,json}  enrolment checkpoints (merged and removed when an enrolment finishes)
Row i of the features is items[i]. `model` holds at least "kind" ("onnx" | "teacher"), "signature" (enrolment
refuses to mix rows of different signatures unless --rebuild), "space" (which text encoders may query it:
"teacher:<name>" or "student:<id>") and "dim".

Every write is atomic (temporary file + os.replace); features are written before the metadata, and the metadata
is the commit record: a crash between the two leaves extra feature rows that the next enrolment trims.
A bare JSON list of items (older collections) loads as format 0 with an empty model record.
"""
import hashlib
import json
import math
import os
import shutil

import numpy as np

FORMAT_VERSION = 1
_FULL_HASH_LIMIT = 256 << 20  # features up to 256 MiB are hashed whole; larger ones by a row sample


class CollectionError(ValueError):
    """A collection that cannot be used. The message is one line meant for the user."""


# ------------------------------------------------------------------------------------------- paths, atomic io
def prefix_paths(prefix):
    p = str(prefix)
    return {"features": p + "_features.npy", "metadata": p + "_metadata.json", "index": p + "_index.faiss",
            "index_meta": p + "_index.json", "partial": p + "_partial"}


def prefix_from_features(features_path):
    s = str(features_path)
    return s[: -len("_features.npy")] if s.endswith("_features.npy") else os.path.splitext(s)[0]


def metadata_for(features_path):
    """The seed's pairing: P_features.npy <-> P_metadata.json."""
    return prefix_paths(prefix_from_features(features_path))["metadata"]


def _tmp(path):
    return f"{path}.tmp.{os.getpid()}"


def _fsync_replace(tmp, path):
    os.replace(tmp, path)
    try:  # make the rename durable too (best effort: not every filesystem allows opening a directory)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_json(path, obj):
    tmp = _tmp(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        _fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_npy(path, arr):
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fingerprint(features):
    """Cheap identity of a feature matrix (rows, dim, content hash; sampled rows above 256 MiB)."""
    f = np.asarray(features)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{f.shape}|{f.dtype.str}".encode())
    if f.nbytes <= _FULL_HASH_LIMIT:
        h.update(np.ascontiguousarray(f).data)
    else:
        idx = np.unique(np.linspace(0, len(f) - 1, 4096).astype(np.int64))
        h.update(np.ascontiguousarray(f[idx]).data)
    return h.hexdigest()


def item_key(item):
    """Identity of a gallery entry for append/resume: (image, box as given)."""
    b = item.get("bbox_src", item.get("bbox"))
    return item["image"], (None if b is None else tuple(round(float(v), 3) for v in b))


# ------------------------------------------------------------------------------------------- reading
class Collection:
    def __init__(self, features, meta, features_path=None, metadata_path=None):
        self.features = features
        self.meta = meta
        self.items = meta["items"]
        self.model = meta.get("model") or {}
        self.dim = int(features.shape[1])
        self.features_path = features_path
        self.metadata_path = metadata_path

    def __len__(self):
        return len(self.items)


def _read_metadata(path):
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CollectionError(f"{path}: metadata file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CollectionError(f"{path}: unreadable metadata ({e.__class__.__name__}: {e})") from None
    except RecursionError:
        raise CollectionError(f"{path}: unreadable metadata (JSON nested too deeply)") from None
    if isinstance(meta, list):  # format 0: a bare list of items
        meta = {"format_version": 0, "model": {}, "items": meta}
    if not isinstance(meta, dict) or not isinstance(meta.get("items"), list):
        raise CollectionError(f"{path}: expected an object with an 'items' list")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CollectionError(f"{path}: format_version {meta['format_version']} is newer than this code "
                              f"({FORMAT_VERSION}); update search/")
    items = []
    for i, it in enumerate(meta["items"]):
        if isinstance(it, str):
            it = {"image": it, "bbox": None}
        if not isinstance(it, dict):
            raise CollectionError(f"{path}: item {i} is not an object")
        img = it.get("image", it.get("image_path", it.get("path")))
        if not isinstance(img, str) or not img:
            raise CollectionError(f"{path}: item {i} has no 'image' path")
        b = it.get("bbox")
        if b is not None and (not isinstance(b, list) or len(b) != 4
                              or not all(type(v) in (int, float) and math.isfinite(v) for v in b)):  # NaN/Infinity
            raise CollectionError(f"{path}: item {i} has an invalid bbox {str(b)[:80]} "
                                  f"(expected 4 finite numbers [x1, y1, x2, y2] or null)")
        items.append(dict(it, image=img, bbox=b))
    meta["items"] = items
    return meta


def _read_features(path, mmap=True):
    try:
        f = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise CollectionError(f"{path}: features file not found") from None
    except (OSError, ValueError) as e:
        raise CollectionError(f"{path}: unreadable features ({e.__class__.__name__}: {e})") from None
    if f.ndim != 2 or f.shape[1] < 1:
        raise CollectionError(f"{path}: expected a 2-D [N, D] array, got shape {f.shape}")
    if f.dtype != np.float32:
        if f.dtype.kind != "f":
            raise CollectionError(f"{path}: expected float features, got {f.dtype}")
        f = np.asarray(f, dtype=np.float32)
    return f


def check_rows(features, path, limit=_FULL_HASH_LIMIT):
    """Refuse (CollectionError) NaN/inf or unnormalised rows: enrolment writes unit rows, so any other row is
    damage, and it would poison every score. All rows up to `limit` bytes, evenly spread blocks beyond."""
    n = len(features)
    block = 65536
    starts = list(range(0, n, block))
    budget = max(1, limit // max(1, block * features.shape[1] * 4))
    if len(starts) > budget:
        starts = [starts[int(i)] for i in np.linspace(0, len(starts) - 1, budget)]
    for s in starts:
        blk = np.asarray(features[s:s + block], dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            norm = np.sqrt((blk * blk).sum(axis=1))
        bad = np.flatnonzero(~(np.abs(norm - 1.0) < 1e-3))  # also catches NaN norms
        if len(bad):
            r = s + int(bad[0])
            what = "non-finite" if not np.isfinite(blk[bad[0]]).all() else f"not unit length (norm {norm[bad[0]]:.4g})"
            raise CollectionError(f"{path}: row {r} is {what} ({len(bad)} such rows in rows {s}..{s + len(blk) - 1}); "
                                  "the file is damaged - re-run enrolment with --rebuild")


def load_collection(features_path, metadata_path=None, mmap=True):
    """Load and validate. Raises CollectionError (one line) on a missing file, row-count or dim mismatch, and
    NaN/inf/unnormalised rows."""
    if not os.path.isfile(features_path):  # before the metadata: its default name is derived from this path
        raise CollectionError(f"{features_path}: features file not found")
    metadata_path = metadata_path or metadata_for(features_path)
    meta = _read_metadata(metadata_path)
    f = _read_features(features_path, mmap)
    n, d = f.shape
    if n != len(meta["items"]):
        raise CollectionError(f"{features_path} has {n} rows but {metadata_path} lists {len(meta['items'])} items "
                              "(mismatched pair of files; re-run enrolment to repair)")
    md = meta.get("dim", (meta.get("model") or {}).get("dim"))
    if md is not None and md != d:
        raise CollectionError(f"{features_path} has {d}-dim features but {metadata_path} says dim {md} "
                              "(mismatched pair of files)")
    check_rows(f, features_path)
    return Collection(f, meta, str(features_path), str(metadata_path))


# ------------------------------------------------------------------------------------------- writing
def make_meta(model, items, dim, features):
    return {"format_version": FORMAT_VERSION, "model": model, "dim": int(dim), "rows": len(items),
            "features_fingerprint": fingerprint(features), "items": items}


def save_collection(prefix, features, model, items):
    """Write a whole collection atomically (features first, then the metadata that commits them)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(items):
        raise CollectionError(f"internal: {len(items)} items for features of shape {features.shape}")
    p = prefix_paths(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(p["features"])), exist_ok=True)
    atomic_save_npy(p["features"], features)
    atomic_write_json(p["metadata"], make_meta(model, items, features.shape[1], features))


class Enrolment:
    """Append-only, resumable writer of a collection.

        enr = Enrolment(prefix, model_record, rebuild=False)   # loads what exists (+ checkpoints of a killed run)
        todo = [e for e in entries if not enr.has(e)]
        enr.add(features_batch, items_batch)                   # buffered
        enr.checkpoint()                                       # durable chunk in P_partial/
        enr.finish()                                           # merge everything into P_features/P_metadata
    """

    def __init__(self, prefix, model, rebuild=False, log=print):
        self.prefix, self.model, self.log = str(prefix), model, log
        self.paths = prefix_paths(prefix)
        self.base_rows, self.base_items = 0, []
        self.chunks = []  # (npy path, json path, n rows) of durable checkpoints, in order
        self.buf_f, self.buf_items = [], []
        self.keys = set()
        if rebuild:
            shutil.rmtree(self.paths["partial"], ignore_errors=True)
            return
        if os.path.exists(self.paths["metadata"]):
            meta = _read_metadata(self.paths["metadata"])
            old = meta.get("model") or {}
            self._check_model(old, self.paths["metadata"])
            f = _read_features(self.paths["features"], mmap=True)
            n = len(meta["items"])
            if len(f) < n:
                raise CollectionError(f"{self.paths['features']} has {len(f)} rows but {self.paths['metadata']} "
                                      f"lists {n} items; re-run with --rebuild")
            if f.shape[1] != model["dim"]:
                raise CollectionError(f"{self.paths['features']} holds {f.shape[1]}-dim features, the model "
                                      f"makes {model['dim']}-dim ones; re-run with --rebuild")
            if len(f) > n:
                log(f"note: {len(f) - n} uncommitted feature rows from an interrupted write dropped")
            self.base_rows, self.base_items = n, meta["items"]
            self.keys.update(item_key(it) for it in self.base_items)
        self._load_chunks()

    def _check_model(self, old, where):
        if old.get("signature") != self.model.get("signature"):
            raise CollectionError(f"{where} was built with a different model ({old.get('kind', '?')} "
                                  f"{old.get('signature', 'unknown')}, now {self.model.get('kind')} "
                                  f"{self.model.get('signature')}); pass --rebuild to re-embed everything, "
                                  "or use another --output-prefix")

    def _load_chunks(self):
        d = self.paths["partial"]
        if not os.path.isdir(d):
            return
        recovered = 0
        for name in sorted(os.listdir(d)):
            if not name.endswith(".json"):
                continue
            jp = os.path.join(d, name)
            npy = jp[:-5] + ".npy"
            try:
                with open(jp, encoding="utf-8") as fh:
                    cm = json.load(fh)
                arr = np.load(npy, mmap_mode="r", allow_pickle=False)
                if not isinstance(cm, dict) or not isinstance(cm.get("items"), list):
                    raise ValueError("not a chunk")
            except (OSError, ValueError, RecursionError):
                continue  # a torn checkpoint: its rows are simply embedded again
            if (cm.get("model") or {}).get("signature") != self.model.get("signature"):
                self._check_model(cm.get("model") or {}, jp)
            if arr.ndim != 2 or len(arr) != len(cm.get("items", [])) or arr.shape[1] != self.model["dim"]:
                continue
            keep = [i for i, it in enumerate(cm["items"]) if item_key(it) not in self.keys]
            if not keep:
                continue
            self.chunks.append((npy, [cm["items"][i] for i in keep], keep))
            self.keys.update(item_key(cm["items"][i]) for i in keep)
            recovered += len(keep)
        if recovered:
            self.log(f"resuming: {recovered} entries recovered from checkpoints in {d}")

    # --- API
    def has(self, item):
        return item_key(item) in self.keys

    @property
    def total(self):
        return self.base_rows + sum(len(c[1]) for c in self.chunks) + sum(len(b) for b in self.buf_f)

    def add(self, features, items):
        features = np.asarray(features, dtype=np.float32)
        assert len(features) == len(items)
        self.buf_f.append(features)
        self.buf_items.extend(items)
        self.keys.update(item_key(it) for it in items)

    def checkpoint(self):
        """Make the buffered rows durable as one chunk file (cheap: only new rows are written)."""
        if not self.buf_items:
            return
        os.makedirs(self.paths["partial"], exist_ok=True)
        n = len(os.listdir(self.paths["partial"]))
        stem = os.path.join(self.paths["partial"], f"chunk_{n:06d}_{os.getpid()}")
        while os.path.exists(stem + ".json"):
            n += 1
            stem = os.path.join(self.paths["partial"], f"chunk_{n:06d}_{os.getpid()}")
        arr = np.concatenate(self.buf_f)
        atomic_save_npy(stem + ".npy", arr)
        atomic_write_json(stem + ".json", {"model": self.model, "items": self.buf_items})  # commits the chunk
        self.chunks.append((stem + ".npy", self.buf_items, list(range(len(arr)))))
        self.buf_f, self.buf_items = [], []

    def finish(self):
        """Merge base + checkpoints + buffer into the collection files (streamed, atomic), drop checkpoints.
        Returns the total row count."""
        self.checkpoint()
        if not self.chunks and os.path.exists(self.paths["metadata"]) and self.base_rows == \
                len(_read_features(self.paths["features"])):
            return self.base_rows  # nothing new and nothing to trim
        items = list(self.base_items)
        for _, its, _ in self.chunks:
            items.extend(its)
        d = self.model["dim"]
        os.makedirs(os.path.dirname(os.path.abspath(self.paths["features"])), exist_ok=True)
        tmp = _tmp(self.paths["features"])
        if not items:  # np.memmap cannot map an empty file
            atomic_save_npy(self.paths["features"], np.zeros((0, d), np.float32))
            atomic_write_json(self.paths["metadata"], make_meta(self.model, [], d, np.zeros((0, d), np.float32)))
            shutil.rmtree(self.paths["partial"], ignore_errors=True)
            return 0
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(items), d))
            r = 0
            if self.base_rows:
                base = _read_features(self.paths["features"], mmap=True)
                for s in range(0, self.base_rows, 65536):  # bounded memory for big galleries
                    e = min(self.base_rows, s + 65536)
                    out[s:e] = base[s:e]
                r = self.base_rows
                del base
            for npy, its, keep in self.chunks:
                a = np.load(npy, mmap_mode="r", allow_pickle=False)
                out[r:r + len(keep)] = a[keep]
                r += len(keep)
            out.flush()
            fp = fingerprint(out)
            del out
            _fsync_replace(tmp, self.paths["features"])
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        meta = {"format_version": FORMAT_VERSION, "model": self.model, "dim": d, "rows": len(items),
                "features_fingerprint": fp, "items": items}
        atomic_write_json(self.paths["metadata"], meta)
        shutil.rmtree(self.paths["partial"], ignore_errors=True)
        self.base_rows, self.base_items, self.chunks = len(items), items, []
        return len(items)
