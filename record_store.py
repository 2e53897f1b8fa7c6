"""Compact record store: a dataset JSON parsed once into memory-mapped columns (issue 14, DESIGN §1).

Parsing a 4.79M-record SYNTH-PEDES JSON costs about 9.7 GB and a minute per process, and every torchrun rank and
DataLoader worker used to hold its own copy. The store holds the same records as numpy columns and utf-8 byte
buffers that every process memory-maps (the pages are shared, nothing is copied on fork), plus the verdict of the
image check, which therefore runs once, when the store is built, and never again on any rank.

Build it (or check that it is current) once, before training or extraction:
  python data.py --data SYNTH-PEDES/synthpedes-dataset.json --index
main.py and tools/extract_label.py build it on first use when it is missing or stale (local rank 0 of each node
builds, the other ranks wait for it) and otherwise just open it. It lives beside the JSON (<stem>.records/) unless
--record_store DIR says elsewhere. A store whose manifest names another dataset sha256 (data.dataset_hash, the
same hash the teacher cache pins), another image root or another format version is rebuilt, never used.

A RecordStore is a Sequence of Records: store[i] is a read-only Mapping with the keys and values of
data.load_records(...)[i], decoded on access, so load_records-level code works on it unchanged; the hot paths
(caption offsets, image check, Dataset filtering, extraction inputs) use its columns directly.

Layout of a store folder (the .npy files are loaded with allow_pickle=False, memory-mapped):
  manifest.json         format_version, dataset (path), dataset_sha256, image_root, counts, splits, image_check
  ids.npy               int64 [N]   identity, CUHK-PEDES 1-based ids already shifted (data.id_shift)
  split.npy             int8  [N]   -1 = no split in the JSON, else an index into manifest["splits"]
  status.npy            int8  [N]   image check: 0 ok, 1 missing, 2 undecodable or empty, 3 not checked
  n_en.npy              int32 [N]   English captions of each record; its other caption rows are Chinese
  caption_offsets.npy   int64 [N+1] record r's caption rows are [r] .. [r+1]-1, English first, then Chinese:
                                    data.caption_offsets, the row order of the teacher cache's caption.npy
  <col>.bin + <col>.off.npy         utf-8 strings: string j is bin[off[j]:off[j+1]] (off int64 [M+1]) for the
                                    columns file_path and attributes, prompt_caption (M = N) and caption
                                    (M = caption rows, in caption.npy order)
  <col>.has.npy         bool  [N]   attributes / prompt_caption: False where the JSON has none (None)
"""
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from array import array
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import data

FORMAT_VERSION = 1
STATUS = ("ok", "missing", "corrupt", "unchecked")
UNCHECKED = 3
STR_COLS = ("file_path", "caption", "attributes", "prompt_caption")
OPTIONAL_COLS = ("attributes", "prompt_caption")
CHECK_MODES = ("auto", "decode", "header", "none")
DECODE_MAX = 200_000   # "auto": decode every image up to this many records, header-only above (minutes saved)
CHUNK_CHARS = 1 << 22  # JSON read granularity: memory holds one chunk plus the record being parsed
CHECK_BATCH = 2048     # image check: paths in flight at once (bounded memory whatever the dataset size)
EXACT_ERROR_MAX_BYTES = 256 << 20  # a broken JSON up to this size is parsed whole once more for data.py's message


class StoreError(data.DatasetError):
    """A record store that cannot be built or used; the message is one line."""


def default_path(json_path):
    """<folder>/<stem>.records beside the JSON."""
    base = os.path.abspath(str(json_path))
    return (base[:-5] if base.lower().endswith(".json") else base) + ".records"


def image_root_of(json_path, image_root=None):
    """The folder file paths are relative to: image_root, else the JSON's folder (as data.load_records)."""
    return os.path.abspath(image_root if image_root is not None else os.path.dirname(os.path.abspath(str(json_path))))


# ----------------------------------------------------------------------------------------------------------------
# streaming JSON

class _JSONStreamError(Exception):
    """Syntax/structure problem while streaming; the caller turns it into data.py's one-line message."""

    def __init__(self, index, msg):
        super().__init__(msg)
        self.index = index


def iter_json_list(path, chunk=None):
    """Yield the elements of a top-level JSON list one by one, holding one chunk (plus the element being decoded)
    in memory, where json.load would hold every record as Python objects (about 1.6 KB each)."""
    dec, chunk = json.JSONDecoder(), chunk or CHUNK_CHARS
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def more():
            nonlocal buf, pos, eof
            got = f.read(chunk)
            eof = not got
            buf, pos = buf[pos:] + got, 0
            return not eof

        def skip_ws():
            nonlocal pos
            while True:
                n = len(buf)
                while pos < n and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < n or not more():
                    return

        skip_ws()
        if buf[pos:pos + 1] != "[":
            raise _JSONStreamError(None, "expected a JSON list of records")
        pos += 1
        i = 0
        while True:
            skip_ws()
            if i == 0 and buf[pos:pos + 1] == "]":
                pos += 1
                break
            while True:
                try:
                    value, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if more():  # the element runs past this chunk
                        continue
                    raise _JSONStreamError(i, e.msg) from None
                if end == len(buf) and not isinstance(value, (dict, list, str)) and more():
                    continue  # a bare number may continue in the next chunk
                break
            pos = end
            yield value
            i += 1
            skip_ws()
            c = buf[pos:pos + 1]
            pos += 1
            if c == "]":
                break
            if c != ",":
                raise _JSONStreamError(i - 1, "missing ',' after it")
        skip_ws()
        if pos < len(buf):
            raise _JSONStreamError(None, "extra data after the list")


# ----------------------------------------------------------------------------------------------------------------
# building

class _StrColumn:
    """Appends utf-8 strings to <col>.bin and their end offsets to an int64 array (8 bytes per string in memory)."""

    def __init__(self, folder, name):
        self.folder, self.name = folder, name
        self.f = open(os.path.join(folder, f"{name}.bin"), "wb", buffering=1 << 20)
        self.off, self.end = array("q", [0]), 0

    def add(self, s):
        b = s.encode("utf-8")
        self.f.write(b)
        self.end += len(b)
        self.off.append(self.end)

    def close(self):
        self.f.close()
        np.save(os.path.join(self.folder, f"{self.name}.off.npy"), np.frombuffer(self.off, dtype=np.int64))


def _json_error(path, image_root, err):
    """data.py's exact message for a broken JSON where we can afford it (small file), else a streaming one."""
    if os.path.getsize(path) <= EXACT_ERROR_MAX_BYTES:
        data.load_records(path, image_root)  # raises the DatasetError that names line, column and record
    where = f"record {err.index}: " if err.index is not None else ""
    return f"{path}: {where}invalid JSON ({err})"


def _check_images(folder, root, n, mode, num_threads, progress):
    """status int8[N], checking CHECK_BATCH paths at a time straight from the file_path column on disk."""
    status = np.full(n, UNCHECKED, dtype=np.int8)
    if mode == "none":
        return status
    buf, off = _load_bin(folder, "file_path"), np.load(os.path.join(folder, "file_path.off.npy"))
    code = {s: k for k, s in enumerate(STATUS)}
    decode = mode == "decode"
    bar = _bar(n, f"image check ({mode})", progress)
    with ThreadPoolExecutor(max(1, num_threads)) as ex:  # PIL releases the GIL while it reads and decodes
        for a in range(0, n, CHECK_BATCH):
            b = min(n, a + CHECK_BATCH)
            paths = [os.path.join(root, buf[off[j]:off[j + 1]].tobytes().decode("utf-8")) for j in range(a, b)]
            status[a:b] = [code[s] for s in ex.map(lambda p: data._image_status(p, decode), paths)]
            bar.update(b - a)
    bar.close()
    return status


def _bar(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="rec", disable=not enabled, dynamic_ncols=True, mininterval=2)


def build(json_path, image_root=None, out=None, check="auto", num_threads=4, progress=True, sha=None):
    """Parse `json_path` (streaming) into a store at `out` (default beside the JSON), check its images, and publish
    it atomically: built in a temporary folder, manifest written last, then renamed into place. -> RecordStore."""
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    path = str(json_path)
    out = out or default_path(path)
    sha = sha or _hash(path)
    root = image_root_of(path, image_root)
    tmp = f"{out}.tmp.{socket.gethostname()}.{os.getpid()}"
    t0 = time.time()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        counts = _write_columns(path, image_root, root, tmp, progress)
        n = counts["records"]
        mode = check if check != "auto" else ("decode" if n <= DECODE_MAX else "header")
        status = _check_images(tmp, root, n, mode, num_threads, progress)
        np.save(os.path.join(tmp, "status.npy"), status)
        if _hash(path) != sha:
            raise StoreError(f"{path}: the file changed while the record store was built; run it again")
        splits = counts.pop("splits")
        counts.update({f"images_{s}": int((status == k).sum()) for k, s in enumerate(STATUS)})
        manifest = dict(format_version=FORMAT_VERSION, dataset=os.path.abspath(path), dataset_sha256=sha,
                        image_root=root, counts=counts, splits=splits, image_check=mode,
                        built_s=round(time.time() - t0, 1))
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
        _publish(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"{out}: cannot write the record store ({type(e).__name__}: {e}); "
                         f"pass --record_store DIR on a writable disk") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RecordStore.open(out)


def _write_columns(path, image_root, root, folder, progress):
    cols = {c: _StrColumn(folder, c) for c in STR_COLS}
    ids, split, n_en, cap_off = array("q"), array("b"), array("i"), array("q", [0])
    has = {c: bytearray() for c in OPTIONAL_COLS}
    splits, head = {}, []
    bar = _bar(None, "record store", progress)
    try:
        for i, raw in enumerate(iter_json_list(path)):
            if i < 100:
                head.append(raw)  # data.id_shift sniffs the format from the first records, as load_records does
            rec = data.parse_record(raw, path, i, root)
            ids.append(rec["id"])
            split.append(-1 if rec["split"] is None else splits.setdefault(rec["split"], len(splits)))
            cols["file_path"].add(rec["file_path"])
            for c in rec["captions"] + rec["captions_zh"]:  # THE caption row order (data.caption_rows)
                cols["caption"].add(c)
            n_en.append(len(rec["captions"]))
            cap_off.append(cap_off[-1] + len(rec["captions"]) + len(rec["captions_zh"]))
            for c in OPTIONAL_COLS:
                has[c].append(rec[c] is not None)
                cols[c].add(rec[c] or "")
            if (i + 1) % 8192 == 0:
                bar.update(8192)
    except _JSONStreamError as e:
        raise StoreError(_json_error(path, image_root, e)) from None
    except UnicodeDecodeError as e:
        raise data.DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    except RecursionError:  # e.g. [[[[...]]]] thousands deep: the decoder recurses per level (as data.load_records)
        raise data.DatasetError(f"{path}: JSON nested too deeply to be a dataset") from None
    finally:
        bar.close()
        for c in cols.values():
            c.close()
    n = len(ids)
    if len(splits) > 127:
        raise StoreError(f"{path}: {len(splits)} distinct 'split' values; at most 127 are supported")
    if n == 0:
        raise data.DatasetError(f"{path}: contains no records")
    shift = data.id_shift(path, head, ids)
    np.save(os.path.join(folder, "ids.npy"), np.frombuffer(ids, dtype=np.int64) - shift)
    np.save(os.path.join(folder, "split.npy"), np.frombuffer(split, dtype=np.int8))
    np.save(os.path.join(folder, "n_en.npy"), np.frombuffer(n_en, dtype=np.int32))
    np.save(os.path.join(folder, "caption_offsets.npy"), np.frombuffer(cap_off, dtype=np.int64))
    for c in OPTIONAL_COLS:
        np.save(os.path.join(folder, f"{c}.has.npy"), np.frombuffer(bytes(has[c]), dtype=np.bool_))
    return dict(records=n, captions=int(cap_off[-1]), captions_en=int(np.frombuffer(n_en, dtype=np.int32).sum()),
                identities=int(len(np.unique(np.frombuffer(ids, dtype=np.int64)))), splits=list(splits))


def _publish(tmp, out):
    """Swap the finished folder in. A reader that has the old store mapped keeps its (unlinked) files."""
    old = None
    if os.path.lexists(out):
        old = f"{out}.old.{socket.gethostname()}.{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if _stale(out, None, None) is None:  # another node published the same store first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# opening

def _hash(path):
    try:
        return data.dataset_hash(path)
    except FileNotFoundError:
        raise data.DatasetError(f"{path}: no such file") from None
    except OSError as e:
        raise data.DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _read_manifest(path):
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _stale(path, sha, root):
    """Why the store at `path` cannot serve (sha, root) - a short reason - or None when it can. None for sha/root
    skips that comparison."""
    m = _read_manifest(path)
    if m is None:
        return "not built yet"
    if m.get("format_version") != FORMAT_VERSION:
        return f"format_version {m.get('format_version')} is not {FORMAT_VERSION}"
    if sha is not None and m.get("dataset_sha256") != sha:
        return f"built for another version of the JSON (sha256 {str(m.get('dataset_sha256'))[:12]}, now {sha[:12]})"
    if root is not None and m.get("image_root") != root:
        return f"built for image root {m.get('image_root')}, not {root}"
    return None


def ensure(json_path, image_root=None, store=None, check="auto", builder=True, num_threads=4, progress=True,
           poll_s=2.0, sha=None):
    """The store of `json_path`, built first when missing or stale (JSON changed, other image root).
    builder=False (torchrun ranks other than each node's local rank 0): wait for the builder instead of building;
    if the builder fails, torchrun stops this rank too. `sha`: data.dataset_hash of the JSON when the caller has it."""
    path = str(json_path)
    out = store or default_path(path)
    sha, root = sha or _hash(path), image_root_of(path, image_root)
    reason = _stale(out, sha, root)
    if reason is not None and builder:
        # one builder at a time, even across nodes sharing the folder: the second finds the first one's store
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            lock = open(f"{out}.lock", "a")
        except OSError as e:
            raise StoreError(f"{out}: cannot write the record store ({type(e).__name__}: {e}); "
                             f"pass --record_store DIR on a writable disk") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            reason = _stale(out, sha, root)
            if reason is not None:
                if progress:
                    print(f"record store {out}: {reason}; building it (once, with the image check)",
                          file=sys.stderr)
                return build(path, image_root, out, check, num_threads, progress, sha=sha)
    while reason is not None:  # not the builder: the manifest appears last, when every column is in place
        time.sleep(poll_s)
        reason = _stale(out, sha, root)
    return RecordStore.open(out)


def _load_bin(folder, name):
    p = os.path.join(folder, f"{name}.bin")
    if os.path.getsize(p) == 0:  # mmap refuses empty files
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(p, dtype=np.uint8, mode="r").view(np.ndarray)


class Record(Mapping):
    """store[i]: the Record of data.load_records as a read-only mapping; each value is read when asked for."""
    __slots__ = ("_s", "_i")
    KEYS = ("id", "file_path", "image_path", "captions", "captions_zh", "attributes", "prompt_caption", "split",
            "index")

    def __init__(self, store, i):
        self._s, self._i = store, i

    def __getitem__(self, key):
        s = self._s
        if key == "id":  # split_records and the sampler groups ask this millions of times: no getter hop
            return int(s._ids[self._i])
        if key == "split":
            code = s._split_codes[self._i]
            return None if code < 0 else s.splits[code]
        return _GETTERS[key](s, self._i)

    def __iter__(self):
        return iter(self.KEYS)

    def __len__(self):
        return len(self.KEYS)

    def __repr__(self):
        return f"Record({dict(self)!r})"


class RecordStore(Sequence):
    """Read-only, memory-mapped records. Pickles as its folder name (DataLoader workers map the files again)."""

    def __init__(self, path, manifest):
        self.path, self.manifest = str(path), manifest
        self.root = manifest["image_root"]
        self.splits = list(manifest.get("splits", []))
        self.n = int(manifest["counts"]["records"])
        self._cols = None

    @classmethod
    def open(cls, path, json_path=None, image_root=None):
        """Open a built store; with `json_path`, refuse (StoreError) one built for other bytes or another root."""
        path = str(path)
        sha = _hash(json_path) if json_path is not None else None
        root = image_root_of(json_path, image_root) if json_path is not None else None
        reason = _stale(path, sha, root)
        if reason is not None:
            raise StoreError(f"{path}: record store {reason}; rebuild it with python data.py --data JSON --index")
        store = cls(path, _read_manifest(path))
        store._columns()  # a damaged store fails here with one line, not later inside a worker
        return store

    def __getstate__(self):
        state = dict(self.__dict__, _cols=None)
        state.pop("_ids", None), state.pop("_split_codes", None)  # rebuilt by __getattr__ in the worker
        return state

    def _columns(self):
        if self._cols is None:
            try:
                c = {k: np.load(os.path.join(self.path, f"{k}.npy"), mmap_mode="r", allow_pickle=False).view(np.ndarray)
                     for k in ("ids", "split", "status", "n_en", "caption_offsets")}
                for s in STR_COLS:
                    c[s] = (_load_bin(self.path, s),
                            np.load(os.path.join(self.path, f"{s}.off.npy"), mmap_mode="r",
                                    allow_pickle=False).view(np.ndarray))
                for s in OPTIONAL_COLS:
                    c[f"{s}.has"] = np.load(os.path.join(self.path, f"{s}.has.npy"), mmap_mode="r",
                                            allow_pickle=False).view(np.ndarray)
            except (OSError, ValueError) as e:
                raise StoreError(f"{self.path}: damaged record store ({type(e).__name__}: {e}); "
                                 f"rebuild it with python data.py --data JSON --index") from None
            n, m = self.n, int(self.manifest["counts"]["captions"])
            if (len(c["ids"]) != n or len(c["caption_offsets"]) != n + 1 or int(c["caption_offsets"][-1]) != m
                    or len(c["caption"][1]) != m + 1 or len(c["file_path"][1]) != n + 1):
                raise StoreError(f"{self.path}: damaged record store (column lengths disagree with the manifest); "
                                 f"rebuild it with python data.py --data JSON --index")
            self._cols = c
            self._ids, self._split_codes = c["ids"], c["split"].tolist()  # N small ints: a list indexes fastest
        return self._cols

    # -- Sequence of Records ------------------------------------------------------------------------------------
    def __len__(self):
        return self.n

    def __getattr__(self, name):  # _ids / _split_codes after unpickling: map the columns again
        if name in ("_ids", "_split_codes"):
            self._columns()
            return self.__dict__[name]
        raise AttributeError(name)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [Record(self, j) for j in range(*i.indices(self.n))]
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"record {i} out of range (0..{self.n - 1})")
        return Record(self, i)

    def __iter__(self):
        return (Record(self, i) for i in range(self.n))

    # -- columns ------------------------------------------------------------------------------------------------
    @property
    def ids(self):
        """int64 [N] identities."""
        return self._columns()["ids"]

    @property
    def n_captions(self):
        return int(self.manifest["counts"]["captions"])

    def caption_offsets(self):
        """int64 [N+1], equal to data.caption_offsets(records)."""
        return self._columns()["caption_offsets"]

    def caption_counts(self):
        """(n_en int32 [N], n_zh int64 [N]) caption rows of each record per language."""
        c = self._columns()
        return c["n_en"], np.diff(c["caption_offsets"]) - c["n_en"]

    def _str(self, col, j):
        buf, off = self._columns()[col]
        return buf[off[j]:off[j + 1]].tobytes().decode("utf-8")

    def _strs(self, col, a, b):
        buf, off = self._columns()[col]
        text = buf[off[a]:off[b]].tobytes()
        o = off[a:b + 1] - off[a]
        return [text[o[k]:o[k + 1]].decode("utf-8") for k in range(b - a)]

    def caption_text(self, row):
        """Text of one caption row (caption.npy order)."""
        return self._str("caption", int(row))

    def caption_record(self, rows):
        """Record index of each caption row."""
        return np.searchsorted(self.caption_offsets(), np.asarray(rows, dtype=np.int64), side="right") - 1

    def pivot_rows(self, rows):
        """For each caption row the row of its English text: itself for English rows, the parallel English
        caption for Chinese ones (data.caption_rows' pivot_text)."""
        rows = np.asarray(rows, dtype=np.int64)
        r = self.caption_record(rows)
        start, n_en = self.caption_offsets()[r], self._columns()["n_en"][r]
        k = rows - start
        return np.where(k < n_en, rows, start + k - n_en)

    def image_path(self, i):
        return os.path.join(self.root, self._str("file_path", int(i)))

    def optional(self, col, i):
        """attributes / prompt_caption of record i, None where the JSON has none."""
        return self._str(col, int(i)) if self._columns()[f"{col}.has"][i] else None

    def nonempty(self, col):
        """bool [N]: records whose attributes / prompt_caption is a non-empty string."""
        _, off = self._columns()[col]
        return self._columns()[f"{col}.has"] & (np.diff(off) > 0)

    @property
    def image_status(self):
        """int8 [N] verdict of the build-time image check, codes index STATUS."""
        return self._columns()["status"]

    def checked_images(self, indices=None):
        """data.check_images' answer from the stored verdict (ok_indices, n_missing, n_corrupt), without touching a
        file. Records the build did not check (image_check none) count as ok; the Dataset's fallback covers them."""
        st = self.image_status
        idx = np.arange(self.n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        s = st[idx]
        return idx[(s == 0) | (s == UNCHECKED)].tolist(), int((s == 1).sum()), int((s == 2).sum())

    def usable(self, indices, langs, compose):
        """The DistillDataset rule (a caption in `langs`, or attributes to compose from) on the columns."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n_en, n_zh = self.caption_counts()
        n = np.zeros(len(idx), dtype=np.int64)
        if "en" in langs:
            n += n_en[idx]
        if "zh" in langs:
            n += n_zh[idx]
        ok = n > 0
        if compose:
            ok |= self.nonempty("attributes")[idx]
        return idx[ok]

    def summary(self):
        m, c = self.manifest, self.manifest["counts"]
        return (f"record store {self.path}: {c['records']} records, {c['identities']} identities, "
                f"{c['captions_en']} en + {c['captions'] - c['captions_en']} zh captions; image check "
                f"{m['image_check']}: {c['images_ok']} ok, {c['images_missing']} missing, "
                f"{c['images_corrupt']} undecodable" + (f", {c['images_unchecked']} not checked"
                                                        if c['images_unchecked'] else ""))


def _captions(s, i, zh):
    c = s._columns()
    a, n_en = int(c["caption_offsets"][i]), int(c["n_en"][i])
    b = int(c["caption_offsets"][i + 1])
    return s._strs("caption", a + n_en, b) if zh else s._strs("caption", a, a + n_en)


def _split(s, i):
    code = int((s._cols or s._columns())["split"][i])
    return None if code < 0 else s.splits[code]


_GETTERS = {
    "id": lambda s, i: int((s._cols or s._columns())["ids"][i]),  # split_records asks millions of times
    "file_path": lambda s, i: s._str("file_path", i),
    "image_path": lambda s, i: s.image_path(i),
    "captions": lambda s, i: _captions(s, i, False),
    "captions_zh": lambda s, i: _captions(s, i, True),
    "attributes": lambda s, i: s.optional("attributes", i),
    "prompt_caption": lambda s, i: s.optional("prompt_caption", i),
    "split": lambda s, i: _split(s, i),
    "index": lambda s, i: i,
}
