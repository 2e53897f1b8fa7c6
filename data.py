"""Dataset JSON readers, train/test split, caption rows, image transforms and the torch Datasets.

The only module that reads a dataset JSON, with record_store.py (which streams it through parse_record into
memory-mapped columns that every rank shares). Three formats load, detected per file:
  SYNTH-PEDES  [{"id", "file_path", "captions", "captions_zh"?, "attributes"?, "prompt_caption"?, "split"?}, ...]
  CUHK-PEDES   reid_raw.json [{"split", "captions", "file_path", "processed_tokens"?, "id" (1-based)}, ...]
  RSTPReid     [{"id", "img_path", "captions", "split"}, ...]
Images are relative to the JSON's folder unless `image_root` is given.

Inspect a dataset (record/identity/caption counts, split sizes, optionally decode every image):
  python data.py --data SYNTH-PEDES/synthpedes-dataset.json --check_images
Build the record store once (memory-mapped columns + the image check; main.py and tools/extract_label.py then map
it instead of parsing the JSON, see record_store.py):
  python data.py --data SYNTH-PEDES/synthpedes-dataset.json --index
  python data.py --data CUHK-PEDES/reid_raw.json --image_root CUHK-PEDES/imgs
"""
import argparse
import hashlib
import json
import os
import random
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from captions import augment_caption, compose_caption_pair, insert_noise_words, mentioned_fields, plain_caption
from cli import fail
from search.charmap import encode_batch
from search.imaging import is_regular_file, to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LANGS = ("en", "zh")

# Record = dict(id, file_path, image_path, captions, captions_zh, attributes, prompt_caption, split, index)
# CaptionRow = (record_index, lang, text, pivot_text)


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message is one line naming the file (and record)."""


# ----------------------------------------------------------------------------------------------------------------
# JSON reading

def _syntax_error(path, text, err):
    """One-line message for a JSON syntax error, naming the top-level record it falls in when we can tell."""
    where = f"line {err.lineno} column {err.colno}: {err.msg}"
    dec, pos = json.JSONDecoder(), text.find("[")
    if pos < 0 or text[:pos].strip():
        return f"{path}: invalid JSON ({where})"
    # walk the top-level array element by element so the user learns which record is broken
    i, pos = 0, pos + 1
    while True:
        while text[pos:pos + 1].isspace():
            pos += 1
        if i == 0 and text[pos:pos + 1] == "]":
            break
        try:
            _, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return f"{path}: record {i}: invalid JSON ({where})"
        while text[pos:pos + 1].isspace():
            pos += 1
        if text[pos:pos + 1] != ",":
            break
        pos, i = pos + 1, i + 1
    if text[pos:pos + 1] == "]":
        return f"{path}: invalid JSON ({where})"
    return f"{path}: record {i}: invalid JSON, missing ',' after it ({where})"


def _str_list(rec, key, path, i, required):
    v = rec.get(key)
    if v is None:
        if required:
            raise DatasetError(f"{path}: record {i}: missing '{key}'")
        return []
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
        raise DatasetError(f"{path}: record {i}: '{key}' must be a list of strings")
    return v


def _first_str(rec, key, path, i):
    """SYNTH-PEDES stores `attributes`/`prompt_caption` as a one-element list; older dumps as a plain string."""
    v = rec.get(key)
    if isinstance(v, list):
        v = v[0] if v else None
    if v is not None and not isinstance(v, str):
        raise DatasetError(f"{path}: record {i}: '{key}' must be a string or a list of strings")
    return v


def parse_record(rec, path, i, root):
    """One raw JSON record -> Record (ids not yet shifted, see id_shift); DatasetError names the record.
    The one validation rule: load_records and the record store (record_store.py) both call it."""
    if not isinstance(rec, dict):
        raise DatasetError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
    fp = rec.get("file_path", rec.get("img_path"))
    if not isinstance(fp, str) or not fp:
        raise DatasetError(f"{path}: record {i}: missing 'file_path' (or 'img_path')")
    pid = rec.get("id")
    if type(pid) is not int:  # bool is an int subclass, and 3.0 / "3" are not ids
        raise DatasetError(f"{path}: record {i}: 'id' must be an integer, got {pid!r:.40}")
    if not -2 ** 63 < pid < 2 ** 63:  # ids live in int64 arrays (metrics, samplers, the store); JSON has no bound
        raise DatasetError(f"{path}: record {i}: 'id' {pid:.3g} does not fit in 64 bits")
    captions = _str_list(rec, "captions", path, i, required=True)
    captions_zh = _str_list(rec, "captions_zh", path, i, required=False)
    if captions_zh and len(captions_zh) != len(captions):
        raise DatasetError(f"{path}: record {i}: 'captions_zh' has {len(captions_zh)} entries but "
                           f"'captions' has {len(captions)} (they must be parallel)")
    split = rec.get("split")
    if split is not None and not isinstance(split, str):
        raise DatasetError(f"{path}: record {i}: 'split' must be a string")
    return dict(id=pid, file_path=fp, image_path=os.path.join(root, fp), captions=captions,
                captions_zh=captions_zh, attributes=_first_str(rec, "attributes", path, i),
                prompt_caption=_first_str(rec, "prompt_caption", path, i),
                split=split.strip().lower() if split else None, index=i)


def id_shift(path, head, ids):
    """1 when the file numbers identities from 1 (CUHK-PEDES), else 0; DatasetError on a negative id.
    `head`: the first raw records (format sniffing), `ids`: every parsed id in record order."""
    # CUHK-PEDES (reid_raw.json, recognised by its processed_tokens) numbers identities from 1. ICFG-PEDES has the
    # same keys but starts at 0, so shift only when no id is 0: shifting never merges ids, but -1 would be wrong.
    is_cuhk = os.path.basename(path) == "reid_raw.json" or any("processed_tokens" in r for r in head
                                                               if isinstance(r, dict))
    min_id, first_neg = None, None
    for i, pid in enumerate(ids):
        if min_id is None or pid < min_id:
            min_id = pid
        if pid < 0 and first_neg is None:
            first_neg = (i, pid)
    if is_cuhk and min_id >= 1:
        return 1
    if first_neg is not None:
        raise DatasetError(f"{path}: record {first_neg[0]}: 'id' must be >= 0, got {first_neg[1]}")
    return 0


def load_records(json_path, image_root=None):
    """Read a dataset JSON into a list of Records (see the module docstring for the formats)."""
    path = str(json_path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(_syntax_error(path, text, e)) from None
    except RecursionError:  # e.g. [[[[...]]]] thousands deep: the decoder recurses per level
        raise DatasetError(f"{path}: JSON nested too deeply to be a dataset") from None
    del text
    if not isinstance(raw, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    if not raw:
        raise DatasetError(f"{path}: contains no records")
    root = os.path.abspath(image_root if image_root is not None else os.path.dirname(os.path.abspath(path)))
    records = [parse_record(rec, path, i, root) for i, rec in enumerate(raw)]
    shift = id_shift(path, raw[:100], (r["id"] for r in records))
    if shift:
        for r in records:
            r["id"] -= shift
    return records


_HASHES = {}  # (path, inode, size, mtime_ns) -> sha256: the record store and the cache both pin a multi-GB JSON


def dataset_hash(json_path):
    """sha256 hex of the JSON file's bytes: the teacher cache manifest and the record store pin the dataset with it.
    Hashed once per process per file version (same inode, size and mtime)."""
    st = os.stat(json_path)
    key = (os.path.abspath(json_path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(json_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


# ----------------------------------------------------------------------------------------------------------------
# caption rows and splits

def caption_offsets(records):
    """int64[N+1]: record r's caption rows are offsets[r] .. offsets[r+1]-1 (en first, then zh)."""
    if hasattr(records, "caption_offsets"):  # a record_store.RecordStore holds them as a column
        return records.caption_offsets()
    counts = np.fromiter((len(r["captions"]) + len(r["captions_zh"]) for r in records), np.int64, len(records))
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def caption_rows(records):
    """THE caption order of caption.npy: per record, its English captions then its Chinese ones."""
    rows = []
    for r, rec in enumerate(records):
        rows.extend((r, "en", c, c) for c in rec["captions"])
        rows.extend((r, "zh", z, c) for z, c in zip(rec["captions_zh"], rec["captions"]))
    return rows


def split_records(records, test_ratio=0.1, split="train", val_ratio=0.0):
    """Record indices of one split: "train", "val" (identities held out of training to choose recipes and
    checkpoints on) or "test" (identities for the final table only).

    A JSON `split` wins ("val" is val, "test" is test). Otherwise whole identities are held out by hashes of the
    id, so every run holds out the same ids whatever the dataset's size or order: test when
    crc32(id) % 1000 < 1000 * test_ratio, then val among the rest when crc32("val/" + id) % 1000 < 1000 * val_ratio
    (a second hash, so the test ids never change with --val_ratio)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    for name, v in (("test_ratio", test_ratio), ("val_ratio", val_ratio)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    cut, vcut = test_ratio * 1000, val_ratio * 1000
    out = []
    for i, rec in enumerate(records):
        if rec["split"] is not None:
            s = rec["split"]
            which = "test" if s == "test" else "val" if s in ("val", "valid", "validation", "dev") else "train"
        else:
            key = str(rec["id"]).encode()
            which = ("test" if zlib.crc32(key) % 1000 < cut
                     else "val" if zlib.crc32(b"val/" + key) % 1000 < vcut else "train")
        if which == split:
            out.append(i)
    return out


# ----------------------------------------------------------------------------------------------------------------
# images

def load_image(path):
    """PIL RGB image, or None when the file is missing, not a regular file (a FIFO would block open() forever),
    empty, truncated or otherwise undecodable. 16-bit images are scaled to 8 bits, not clipped (search.imaging)."""
    if not is_regular_file(path):
        return None
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated JPEG must fail here, not later inside a DataLoader worker
            return to_rgb(im)
    except Exception:  # PIL raises OSError, SyntaxError, struct.error, ... on bad files; all mean "skip it"
        return None


def _image_status(path, decode):
    if not os.path.exists(path):  # (a dangling symlink too)
        return "missing"
    if not is_regular_file(path):
        return "corrupt"  # a FIFO/socket/device/folder/dangling link: never opened (a FIFO would hang)
    if os.path.getsize(path) == 0:
        return "corrupt"
    if decode:
        return "ok" if load_image(path) is not None else "corrupt"
    try:  # header only: cheap, catches non-images but not truncation (the Dataset fallback covers that)
        with Image.open(path):
            return "ok"
    except Exception:
        return "corrupt"


def check_images(records, indices=None, decode=True, num_threads=4):
    """Find usable images -> (ok_indices, n_missing, n_corrupt). Zero-byte files count as undecodable.
    Threads help because PIL releases the GIL while decoding."""
    if hasattr(records, "checked_images"):  # a record store: checked once when it was built, never again
        return records.checked_images(indices)
    indices = range(len(records)) if indices is None else indices
    idx = list(indices)
    paths = [records[i]["image_path"] for i in idx]
    with ThreadPoolExecutor(max(1, num_threads)) as ex:
        status = list(ex.map(lambda p: _image_status(p, decode), paths))
    ok = [i for i, s in zip(idx, status) if s == "ok"]
    return ok, status.count("missing"), status.count("corrupt")


def format_skip_summary(n_missing, n_corrupt):
    """The one line callers print after check_images."""
    return f"skipped {n_missing + n_corrupt} images ({n_missing} missing, {n_corrupt} undecodable)"


# ----------------------------------------------------------------------------------------------------------------
# transforms

class ToRGB:
    """PIL -> RGB (a class, not a lambda, so transforms pickle into DataLoader workers)."""

    def __call__(self, img):
        return to_rgb(img)


class RandomScaleShift:
    """Crop 85-100% of the area with +-10% aspect jitter at a random position, then resize to (H, W).
    Unlike RandomResizedCrop the aspect is relative to the source image, so train crops look like the eval
    full-image resize. Randomness comes from torch's RNG (the Dataset seeds it per item)."""

    def __init__(self, size, scale=(0.85, 1.0), ratio=(0.9, 1.1)):
        self.size, self.scale, self.ratio = tuple(size), scale, ratio

    def __call__(self, img):
        w0, h0 = img.size
        s, r = torch.empty(2).uniform_(0, 1).tolist()
        s = self.scale[0] + s * (self.scale[1] - self.scale[0])
        r = self.ratio[0] + r * (self.ratio[1] - self.ratio[0])
        w = max(1, min(w0, round(w0 * (s * r) ** 0.5)))
        h = max(1, min(h0, round(h0 * (s / r) ** 0.5)))
        x = int(torch.randint(0, w0 - w + 1, ()).item())
        y = int(torch.randint(0, h0 - h + 1, ()).item())
        return img.resize(self.size[::-1], Image.BILINEAR, box=(x, y, x + w, y + h))


def build_transform(image_size=(224, 112), train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL image -> float32 [3, H, W]. Eval is exactly what search/ does in numpy: RGB, PIL bilinear resize to
    (W, H), /255, (x - mean) / std. Train adds light geometry only; colour jitter would break colour words."""
    h, w = image_size
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if not train:
        return T.Compose([ToRGB(), T.Resize((h, w), interpolation=T.InterpolationMode.BILINEAR)] + norm)
    return T.Compose([ToRGB(), RandomScaleShift((h, w)), T.RandomHorizontalFlip()] + norm
                     + [T.RandomErasing(p=0.25, scale=(0.02, 0.2), value=0)])


# ----------------------------------------------------------------------------------------------------------------
# Datasets

class DistillDataset(Dataset):
    """One item per usable image record: the image, one caption (or a freshly composed one) and teacher rows.

    `indices` are record indices, normally already filtered by check_images; records with no caption in `langs`
    (and nothing to compose from) are dropped, counted in `n_dropped`. Randomness comes from (seed, epoch, item),
    so a resumed run sees the same items; call set_epoch(e) each epoch (with persistent_workers=False, or the
    workers keep the old epoch). The teacher cache's memmaps are opened lazily in each worker, never pickled.
    """

    def __init__(self, records, indices, cache=None, image_size=(224, 112), train=True, max_seq_length=128,
                 vocab_size=8192, compose_prob=0.0, compose_zh_prob=0.5, langs=("en", "zh"), seed=0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, augment_prob=0.0, attr_vocab=None, return_text=False,
                 filler_words=(), plain_targets=False, noise_word_prob=0.0):
        bad = [l for l in langs if l not in LANGS]
        if bad or not langs:
            raise ValueError(f"langs must be a non-empty subset of {LANGS}, got {tuple(langs)}")
        self.records, self.langs = records, tuple(langs)
        self.offsets = caption_offsets(records)
        self.compose_prob, self.compose_zh_prob = float(compose_prob), float(compose_zh_prob)
        self.augment_prob, self.attr_vocab = float(augment_prob), attr_vocab
        self.return_text = bool(return_text)  # items carry their text (for main.py's --text_teacher)
        self.filler_words = tuple(filler_words)  # real words augment_caption may wrap around the attributes
        self.plain_targets = bool(plain_targets)  # query-like items also carry their bare keyword list
        self.noise_word_prob = float(noise_word_prob)  # English texts that get meaningless words inserted
        self.max_seq_length, self.vocab_size, self.seed, self.epoch = max_seq_length, vocab_size, seed, 0
        gen = self.compose_prob > 0 or self.augment_prob > 0  # captions can be generated from the attributes
        if hasattr(records, "usable"):  # a record store: the same rule on its columns, no per-record objects
            keep = records.usable(indices, self.langs, gen)
        else:
            keep = [int(r) for r in indices if self._rows(int(r)) or (gen and records[r]["attributes"])]
        self.indices = np.asarray(keep, dtype=np.int64)
        self.n_dropped = len(indices) - len(keep)
        if len(self.indices) == 0:
            raise DatasetError(f"no usable records: none of {len(indices)} has a caption in langs {self.langs}")
        self.transform = build_transform(image_size, train, mean, std)
        self.cache, self.dim = cache, 0
        if cache is not None:  # a cache for another dataset would silently pair wrong rows: refuse it
            for field, n in (("image", len(records)), ("caption", int(self.offsets[-1]))):
                if len(cache.done(field)) != n:
                    raise DatasetError(f"teacher cache has {len(cache.done(field))} {field} rows but the "
                                       f"dataset has {n}; rebuild it with tools/extract_label.py")
            self.dim = int(cache.array("image").shape[1])
        self._arrays = None  # per-process memmaps, see _teacher()
        self._bad = set()    # items whose image failed to load in this process

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.indices)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"], state["_bad"] = None, set()  # memmaps would pickle as full in-memory copies
        return state

    def _rows(self, r):
        """Caption rows of record r in the allowed langs."""
        rec, start = self.records[r], int(self.offsets[r])
        n_en, n_zh = len(rec["captions"]), len(rec["captions_zh"])
        rows = list(range(start, start + n_en)) if "en" in self.langs else []
        if "zh" in self.langs:
            rows += range(start + n_en, start + n_en + n_zh)
        return rows

    def _teacher(self):
        if self.cache is None:
            return None
        if self._arrays is None:
            self._arrays = {f: (self.cache.array(f), self.cache.done(f)) for f in ("image", "caption")}
        return self._arrays

    def _emb(self, field, row):
        arrays = self._teacher()
        if arrays is None or row < 0 or not arrays[field][1][row]:
            return torch.zeros(self.dim), False
        return torch.from_numpy(np.asarray(arrays[field][0][row], dtype=np.float32)), True

    def __getitem__(self, i):
        n = len(self.indices)
        # a file that went bad after check_images: serve the next loadable item instead of killing the run
        for t in range(min(n, 64)):
            j = (i + t) % n
            if j in self._bad:
                continue
            r = int(self.indices[j])
            img = load_image(self.records[r]["image_path"])
            if img is not None:
                return self._item(j, r, img)
            if not self._bad:
                print(f"warning: cannot load {self.records[r]['image_path']}; using another image "
                      f"(reported once per worker)", file=sys.stderr)
            self._bad.add(j)
        raise DatasetError(f"no loadable image among {min(n, 64)} items from item {i}; run check_images first")

    def _item(self, j, r, img):
        rng = random.Random(f"{self.seed}:{self.epoch}:{j}")  # str seeds hash with sha512: stable across runs
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG; keep it untouched
            # the CPU generator only (what torchvision draws from): torch.manual_seed would also queue lazy seeds
            # for every accelerator backend, each recording a stack trace -- ~25% of an item's CPU time
            torch.default_generator.manual_seed(rng.getrandbits(63))
            image = self.transform(img)
        rec, rows = self.records[r], self._rows(r)
        attrs = rec["attributes"]
        zh = "zh" in self.langs and ("en" not in self.langs or rng.random() < self.compose_zh_prob)
        lang = "zh" if zh else "en"
        u = rng.random()
        query_lang = 0  # 1/2: a query-like en/zh text with no cache row (an online text teacher may embed it)
        plain = None
        if attrs and (not rows or u < self.compose_prob):  # a caption sentence composed from the attributes
            cap_row = -1
            en, zh_text = compose_caption_pair(attrs, rng)
            text, fields = (zh_text if zh else en), mentioned_fields(attrs, en)
        elif attrs and u < self.compose_prob + self.augment_prob:  # a query-like text (keywords, fields, ...)
            cap_row = -1
            text, fields = augment_caption(attrs, rng, lang, self.filler_words or None)
            query_lang = 2 if zh else 1
            plain = plain_caption(attrs, fields, lang) if self.plain_targets else None
        else:
            cap_row = rows[rng.randrange(len(rows))]
            k, n_en = cap_row - int(self.offsets[r]), len(rec["captions"])
            text = rec["captions"][k] if k < n_en else rec["captions_zh"][k - n_en]
            zh = k >= n_en
            # a Chinese row names what its parallel English caption names
            fields = mentioned_fields(attrs, rec["captions"][k if k < n_en else k - n_en]) if attrs else set()
        # only drawn when on: with the default the random stream (and so a run) is exactly what it was
        if self.noise_word_prob > 0 and not zh and rng.random() < self.noise_word_prob:
            text = insert_noise_words(text, rng, self.filler_words or None, max_chars=self.max_seq_length)
        ids, mask = encode_batch([text], max_len=self.max_seq_length, vocab_size=self.vocab_size)
        t_img, has_img = self._emb("image", r)
        t_cap, has_cap = self._emb("caption", cap_row)
        item = dict(image=image, text_ids=torch.from_numpy(ids[0]).long(),
                    text_mask=torch.from_numpy(mask[0]).bool(), pid=rec["id"], img_row=r, cap_row=cap_row,
                    t_img_emb=t_img, t_cap_emb=t_cap, has_t_img=has_img, has_t_cap=has_cap,
                    query_lang=query_lang)
        if self.return_text:
            item["text"] = text
        if self.plain_targets:  # fixed shapes for collation; has_plain says which rows hold one
            p_ids, p_mask = encode_batch([plain or ""], max_len=self.max_seq_length, vocab_size=self.vocab_size)
            item.update(plain_ids=torch.from_numpy(p_ids[0]).long(), plain_mask=torch.from_numpy(p_mask[0]).bool(),
                        has_plain=bool(plain))
        if self.attr_vocab is not None:
            for key, f in (("img", None), ("cap", fields)):
                t, w = self.attr_vocab.targets(attrs, f)
                item[f"attr_{key}_target"], item[f"attr_{key}_weight"] = torch.tensor(t), torch.tensor(w)
        return item


class EvalImages(Dataset):
    """Eval-transformed image tensors of the given record indices (filter them with check_images first)."""

    def __init__(self, records, indices, image_size=(224, 112), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.records, self.indices = records, [int(i) for i in indices]
        self.transform = build_transform(image_size, False, mean, std)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        path = self.records[self.indices[i]]["image_path"]
        img = load_image(path)
        if img is None:  # eval must not silently swap images: that would corrupt the metrics
            raise DatasetError(f"{path}: cannot load image (filter eval indices with check_images)")
        return self.transform(img)


def eval_captions(records, indices, langs=("en",)):
    """Query captions of the given records -> [(caption_row, pid, record_index, text)] in caption-row order."""
    offsets = caption_offsets(records)
    out = []
    for r in indices:
        rec, start, n_en = records[r], int(offsets[r]), len(records[r]["captions"])
        if "en" in langs:
            out.extend((start + k, rec["id"], r, c) for k, c in enumerate(rec["captions"]))
        if "zh" in langs:
            out.extend((start + n_en + k, rec["id"], r, z) for k, z in enumerate(rec["captions_zh"]))
    return out


# ----------------------------------------------------------------------------------------------------------------

def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("dataset summary", add_help=add_help)
    p.add_argument("--data", required=True, help="dataset JSON (SYNTH-PEDES, CUHK-PEDES reid_raw.json, RSTPReid)")
    p.add_argument("--image_root", default=None, help="image folder (default: the JSON's folder)")
    p.add_argument("--test_ratio", type=float, default=0.1, help="identity hold-out when the JSON has no split")
    p.add_argument("--check_images", action="store_true", help="decode every image and count the bad ones")
    p.add_argument("--num_threads", type=int, default=4)
    p.add_argument("--index", action="store_true",
                   help="build the record store (record_store.py) if it is missing or stale, then summarise from it")
    p.add_argument("--record_store", default=None, help="record store folder (default: <json stem>.records beside it)")
    p.add_argument("--image_check", default="auto", choices=["auto", "decode", "header", "none"],
                   help="image check run once by --index: auto = decode up to 200k records, header-only above")
    return p


def main(args):
    try:
        if args.index:
            import record_store
            records = record_store.ensure(args.data, args.image_root, args.record_store, args.image_check,
                                          num_threads=args.num_threads)
            print(records.summary())
        else:
            records = load_records(args.data, args.image_root)
        train, test = (split_records(records, args.test_ratio, s) for s in ("train", "test"))
    except (DatasetError, ValueError) as e:
        fail(f"{e}")
    if args.index:  # counts come from the store's columns: no pass over millions of records here
        ids = records.ids
        print(f"split: {len(train)} train / {len(test)} test images, "
              f"{len(np.unique(ids[train]))} / {len(np.unique(ids[test]))} identities")
        return
    n_zh = sum(len(r["captions_zh"]) for r in records)
    print(f"{args.data}: {len(records)} images, {len({r['id'] for r in records})} identities, "
          f"{len(caption_rows(records)) - n_zh} en + {n_zh} zh captions, "
          f"{sum(r['attributes'] is not None for r in records)} with attributes")
    print(f"split: {len(train)} train / {len(test)} test images, "
          f"{len({records[i]['id'] for i in train})} / {len({records[i]['id'] for i in test})} identities")
    if args.check_images:
        ok, n_missing, n_corrupt = check_images(records, num_threads=args.num_threads)
        print(f"{len(ok)} images ok; " + format_skip_summary(n_missing, n_corrupt))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
