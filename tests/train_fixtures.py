"""A stand-in teacher cache for trainer/eval tests: the real cache format, filled without a teacher model.

Each identity's attributes hash to a fixed random direction, so images and captions of one person share a
teacher embedding (plus noise), as a privileged attribute teacher would give. Fast: no model is loaded.
"""
import zlib

import numpy as np

import data as data_lib
from embedding_cache import EmbeddingCache


def attribute_vector(text, dim):
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    return rng.normal(size=dim).astype(np.float32)


def make_fake_cache(data_json, path, dim=32, noise=0.3, seed=0):
    records = data_lib.load_records(data_json)
    rows = data_lib.caption_rows(records)
    counts = {"image": len(records), "caption": len(rows), "attributes": len(records),
              "prompt_caption": len(records)}
    manifest = {"teacher": "fake-attributes", "teacher_kind": "attributes", "logit_scale": None,
                "logit_bias": None, "dataset": str(data_json), "dataset_sha256": data_lib.dataset_hash(data_json),
                "preprocessing": {}, "multilingual": False}
    cache = EmbeddingCache.create(path, manifest, counts, dim)
    rng = np.random.default_rng(seed)
    base = np.stack([attribute_vector(r["attributes"] or str(r["id"]), dim) for r in records])
    cache.write("image", np.arange(len(records)), base + noise * rng.normal(size=base.shape))
    cache.write("attributes", np.arange(len(records)), base)
    cache.write("prompt_caption", np.arange(len(records)), base)
    cap = np.stack([base[r[0]] for r in rows])
    cache.write("caption", np.arange(len(rows)), cap + noise * rng.normal(size=cap.shape))
    return str(path)
