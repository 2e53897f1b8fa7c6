r"""Search back ends behind one interface: faiss files (default, embedded) or a Milvus collection.

    --backend faiss    PREFIX_features.npy + PREFIX_metadata.json (+ PREFIX_index.*): search/collection.py and
                       search/index.py; one machine, the gallery memory-mapped
    --backend milvus   a Milvus collection. --uri collection/gallery.db = Milvus Lite, the embedded single-file
                       Milvus (pip install milvus-lite; tests, laptops: it searches by brute force);
                       --uri http://host:19530 = a Milvus server or cluster (--token user:password if it has auth),
                       the same code; the collection is --collection NAME (default: the last part of the prefix)

    # enrol into Milvus Lite, then search it, filtered to one camera folder
    python search/enroll_by_onnx.py --image-dir frames --model_dir export --backend milvus \
        --uri collection/gallery.db --output-prefix collection/frames --prune
    python search/api.py --backend milvus --uri collection/gallery.db --collection frames --model_dir export \
        --queries "a man in a red coat" --folder cam1          # or --filter 'source == "coco" and folder like "cam%"'

Milvus rows: key VARCHAR(32) primary key (a hash of the entry's identity: image + box as given, collection.item_key),
vector FLOAT_VECTOR(D) (metric IP, AUTOINDEX), image VARCHAR (path relative to the image root), folder VARCHAR (the
image's folder, '' at the top: 'cam1' for 'cam1/0001.jpg'), source VARCHAR ('image' | 'boxes' | 'coco') and item
JSON (the whole metadata item: bbox, size, score, bbox_src). The model record (kind, signature, space, dim) is the
collection property "person_search.model"; enrolment refuses a collection of another model unless --rebuild.
Enrolment upserts every batch (the database is the checkpoint: a killed run resumes by skipping the keys present);
--prune deletes the entries whose image file is gone, on both back ends.
Filters: --folder F (both back ends: entries whose folder is exactly F) and --filter EXPR (Milvus boolean
expression over image, folder, source and item["..."], e.g. 'folder in ["cam1", "cam2"]'; Milvus only). The faiss
back end answers a --folder query by exact search over that folder's rows.
Only numpy and the collection/index modules are imported at load; pymilvus only when the milvus back end is used.
"""
import hashlib
import json
import os
import re

import numpy as np

from search.collection import (FORMAT_VERSION, CollectionError, Enrolment, _fsync_replace, _read_features,
                               _read_metadata, _tmp, atomic_write_json, fingerprint, item_key, load_collection,
                               metadata_for, prefix_from_features, prefix_paths)

BACKENDS = ("faiss", "milvus")
MODEL_PROPERTY = "person_search.model"
MAX_PATH_BYTES = 4096
UPSERT_ROWS = 512
OUTPUT_FIELDS = ["image", "source", "item"]


def add_backend_args(p, enrol=False):
    """--backend/--uri/--collection/--token (+ --prune for enrolment, --folder/--filter for search)."""
    p.add_argument("--backend", choices=BACKENDS, default="faiss",
                   help="faiss: feature/metadata files (default); milvus: a Milvus collection at --uri")
    p.add_argument("--uri", default=None,
                   help="milvus: a Milvus Lite file (e.g. collection/gallery.db) or a server, http://host:19530")
    p.add_argument("--collection", default=None,
                   help="milvus collection name (default: the last part of --output-prefix / the features prefix)")
    p.add_argument("--token", default=os.environ.get("MILVUS_TOKEN"),
                   help="milvus credentials 'user:password' or an API key (default: $MILVUS_TOKEN)")
    if enrol:
        p.add_argument("--prune", action="store_true",
                       help="remove entries whose image is no longer under --image-dir (both back ends)")
    else:
        p.add_argument("--folder", default=None, help="only results whose image lies directly in this folder "
                                                       "(relative to the image root, e.g. cam1)")
        p.add_argument("--filter", default=None,
                       help="milvus boolean expression over image, folder, source, item[...] "
                            "(e.g. 'folder == \"cam1\"')")
    return p


def folder_of(image):
    """'cam1/0001.jpg' -> 'cam1'; 'a.jpg' -> ''."""
    return image.rsplit("/", 1)[0] if "/" in image else ""


def entry_key(item):
    """Primary key of a gallery entry: a hash of collection.item_key (image, box as given)."""
    return hashlib.blake2b(json.dumps(item_key(item)).encode("utf-8"), digest_size=16).hexdigest()


def quote(s):
    """A Milvus string literal (backslash-escaped)."""
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def collection_name(name, prefix):
    """Milvus names: letters, digits and '_', starting with a letter or '_'."""
    n = name or os.path.basename(str(prefix).rstrip("/\\")) or "gallery"
    n = re.sub(r"[^A-Za-z0-9_]", "_", n)
    return n if re.match(r"[A-Za-z_]", n) else "_" + n


# ------------------------------------------------------------------------------------------- milvus connection
def connect(uri, token=None):
    if not uri:
        raise CollectionError("--backend milvus needs --uri (a Milvus Lite file such as collection/gallery.db, "
                              "or a server such as http://host:19530)")
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise CollectionError("--backend milvus needs pymilvus (pip install pymilvus milvus-lite)") from None
    import logging

    # pymilvus warns on every query iterator against Milvus Lite ("failed to get mvccTs ... use client-side ts"),
    # and logs every failed call with its traceback before raising it; the caller turns the exception into one
    # `error:` line, so its own log would only repeat it as a traceback
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    if "://" not in uri:  # Lite's in-process gRPC server logs the unimplemented call behind that warning
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        d = os.path.dirname(os.path.abspath(uri))
        if not os.path.isdir(d):
            raise CollectionError(f"--uri {uri}: folder {d} does not exist")
    try:
        return MilvusClient(uri=uri, token=token or "")
    except Exception as e:  # noqa: BLE001 - pymilvus raises its own types for unreachable servers / locked files
        raise CollectionError(f"--uri {uri}: cannot connect to Milvus ({_first_line(e)})") from None


def release(uri):
    """Stop this process's embedded Milvus Lite server of a .db file, so another process may open the file (Lite
    keeps one server per file for the life of the process, holding an exclusive lock on it)."""
    if uri and "://" not in uri:
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:
            return
        server_manager_instance.release_server(uri)


def _first_line(e):
    s = str(getattr(e, "message", None) or e).strip().splitlines()
    return (s[0] if s else e.__class__.__name__)[:300]


def _read_model(client, name):
    props = (client.describe_collection(name) or {}).get("properties") or {}
    try:
        rec = json.loads(props.get(MODEL_PROPERTY) or "{}")
    except ValueError:
        rec = {}
    return rec if isinstance(rec, dict) else {}


def _count(client, name):
    res = client.query(name, filter="", output_fields=["count(*)"])
    return int(res[0]["count(*)"]) if res else 0


def _iterate(client, name, fields, batch=4096):
    """All rows of a collection, `fields` only, in batches (bounded memory on the client)."""
    it = client.query_iterator(name, batch_size=batch, filter="", output_fields=fields)
    try:
        while True:
            rows = it.next()
            if not rows:
                return
            yield from rows
    finally:
        it.close()


class MilvusEnrolment:
    """Collection.Enrolment's interface over a Milvus collection: has / total / add / checkpoint / finish / prune.
    Every add() is upserted at once, so the database itself is the checkpoint."""

    def __init__(self, uri, name, model, rebuild=False, token=None, log=print):
        from pymilvus import DataType

        self.client, self.name, self.model, self.log = connect(uri, token), name, model, log
        self.where = f"{uri} collection {name}"
        c = self.client
        if rebuild and c.has_collection(name):
            c.drop_collection(name)
        self.keys = set()
        if c.has_collection(name):
            old = _read_model(c, name)
            if old.get("signature") != model.get("signature"):
                raise CollectionError(f"{self.where} was built with a different model ({old.get('kind', '?')} "
                                      f"{old.get('signature', 'unknown')}, now {model.get('kind')} "
                                      f"{model.get('signature')}); pass --rebuild to re-embed everything, or use "
                                      "another --collection")
            c.load_collection(name)
            self.keys = {r["key"] for r in _iterate(c, name, ["key"])}
            if self.keys:
                log(f"resuming: {len(self.keys)} entries already in {self.where}")
        else:
            s = c.create_schema(auto_id=False, enable_dynamic_field=False)
            s.add_field("key", DataType.VARCHAR, is_primary=True, max_length=32)
            s.add_field("vector", DataType.FLOAT_VECTOR, dim=int(model["dim"]))
            s.add_field("image", DataType.VARCHAR, max_length=MAX_PATH_BYTES)
            s.add_field("folder", DataType.VARCHAR, max_length=MAX_PATH_BYTES)
            s.add_field("source", DataType.VARCHAR, max_length=32)
            s.add_field("item", DataType.JSON)
            ip = c.prepare_index_params()
            ip.add_index("vector", index_type="AUTOINDEX", metric_type="IP")
            c.create_collection(name, schema=s, index_params=ip)
            c.alter_collection_properties(name, properties={MODEL_PROPERTY: json.dumps(model)})
        self.skipped_long = 0

    def has(self, item):
        return entry_key(item) in self.keys

    @property
    def total(self):
        return _count(self.client, self.name)

    def add(self, features, items):
        features = np.asarray(features, dtype=np.float32)
        rows = []
        for f, it in zip(features, items):
            if len(it["image"].encode("utf-8")) > MAX_PATH_BYTES:
                self.skipped_long += 1
                continue
            k = entry_key(it)
            rows.append({"key": k, "vector": f.tolist(), "image": it["image"], "folder": folder_of(it["image"]),
                         "source": str(it.get("source", ""))[:32], "item": it})
            self.keys.add(k)
        for s in range(0, len(rows), UPSERT_ROWS):
            self.client.upsert(self.name, rows[s:s + UPSERT_ROWS])

    def checkpoint(self):
        pass  # every add() is already durable

    def finish(self):
        return self.total

    def close(self):
        self.client.close()

    def prune(self, present):
        """Delete entries whose image is not in `present` (a set of relative paths). -> number removed."""
        gone = [r["key"] for r in _iterate(self.client, self.name, ["key", "image"]) if r["image"] not in present]
        for s in range(0, len(gone), 1000):
            self.client.delete(self.name, ids=gone[s:s + 1000])
        self.keys.difference_update(gone)
        return len(gone)


class FaissEnrolment(Enrolment):
    """collection.Enrolment plus --prune (rewrites the committed collection without the vanished images)."""

    def prune(self, present):
        p = prefix_paths(self.prefix)
        if not os.path.exists(p["metadata"]):
            return 0
        meta = _read_metadata(p["metadata"])
        keep = np.array([i for i, it in enumerate(meta["items"]) if it["image"] in present], np.int64)
        n_gone = len(meta["items"]) - len(keep)
        if n_gone == 0:
            return 0
        src = _read_features(p["features"], mmap=True)
        d = src.shape[1]
        tmp = _tmp(p["features"])
        try:  # streamed: the kept rows are copied chunk by chunk into a new memory-mapped file
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keep), d))
            for s in range(0, len(keep), 100_000):
                out[s:s + 100_000] = src[keep[s:s + 100_000]]
            out.flush()
            fp = fingerprint(out)
            del out, src
            _fsync_replace(tmp, p["features"])
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        items = [meta["items"][i] for i in keep]
        atomic_write_json(p["metadata"], {"format_version": FORMAT_VERSION, "model": meta.get("model") or self.model,
                                          "dim": d, "rows": len(items), "features_fingerprint": fp,
                                          "items": items})
        self.base_rows, self.base_items = len(items), items
        self.keys = {item_key(it) for it in items}
        return n_gone


def open_enrolment(args, model, log=print):
    """The enrolment writer of args.backend (faiss files at --output-prefix, or Milvus at --uri)."""
    if getattr(args, "backend", "faiss") == "milvus":
        return MilvusEnrolment(args.uri, collection_name(args.collection, args.output_prefix), model,
                               rebuild=args.rebuild, token=args.token, log=log)
    return FaissEnrolment(args.output_prefix, model, rebuild=args.rebuild, log=log)


def describe_target(args):
    """Where an enrolment writes, for the summary line."""
    if getattr(args, "backend", "faiss") == "milvus":
        return f"{args.uri} (milvus collection {collection_name(args.collection, args.output_prefix)})"
    return prefix_paths(args.output_prefix)["features"]


# ------------------------------------------------------------------------------------------- search side
class FaissStore:
    """A collection's files + its faiss index. search(q [1,D], k, folder, expr) -> [(score, row, item)]."""

    backend = "faiss"

    def __init__(self, features_path, metadata_path=None, index="auto", ef_search=None, nprobe=None,
                 save_index=True, log=None, search_threads=None, recall_target=None):
        from search.index import get_index

        self.collection = load_collection(features_path, metadata_path or metadata_for(features_path))
        c = self.collection
        self.dim, self.model = c.dim, c.model
        self.index = get_index(c.features, prefix_from_features(features_path), index, save=save_index,
                               ef_search=ef_search, nprobe=nprobe, log=log, search_threads=search_threads,
                               recall_target=recall_target)
        self._images = None
        self._folders = None

    def __len__(self):
        return len(self.collection)

    def has_image(self, rel):
        if self._images is None:
            self._images = {it["image"].replace("\\", "/") for it in self.collection.items}
        return rel in self._images

    def folder_rows(self, folder):
        if self._folders is None:
            f = {}
            for i, it in enumerate(self.collection.items):
                f.setdefault(folder_of(it["image"]), []).append(i)
            self._folders = {k: np.asarray(v, np.int64) for k, v in f.items()}
        return self._folders.get(folder, np.zeros(0, np.int64))

    def search(self, q, k, folder=None, expr=None):
        if expr:
            raise CollectionError("--filter needs --backend milvus (the faiss back end filters by --folder only)")
        items = self.collection.items
        if folder is None:
            scores, rows = self.index.search(q, k)
        else:  # exact over the folder's rows, a chunk at a time: a camera folder is a small part of a gallery
            sel = self.folder_rows(folder)
            feats = self.collection.features
            best_s, best_r = np.zeros(0, np.float32), np.zeros(0, np.int64)
            for s in range(0, len(sel), 100_000):
                r = sel[s:s + 100_000]
                sc = np.asarray(feats[r], np.float32) @ np.asarray(q[0], np.float32)
                best_s, best_r = np.concatenate([best_s, sc]), np.concatenate([best_r, r])
                o = np.argsort(-best_s, kind="stable")[:k]
                best_s, best_r = best_s[o], best_r[o]
            scores, rows = best_s[None], best_r[None]
        return [(float(s), int(r), items[r]) for s, r in zip(scores[0].tolist(), rows[0].tolist())]


class _MilvusIndexInfo:
    kind = "milvus"


class MilvusStore:
    """FaissStore's interface over a Milvus collection (Lite file or server)."""

    backend = "milvus"

    def __init__(self, uri, name, token=None, consistency="Bounded"):
        # Bounded: a query may miss rows upserted in the last moments (an enrolment still running) but does not
        # wait for them; Strong waited ~20 ms more per query on Milvus Lite
        self.client, self.name, self.consistency = connect(uri, token), name, consistency
        self.where = f"{uri} collection {name}"
        if not self.client.has_collection(name):
            raise CollectionError(f"{uri}: no collection {name!r} (enrol it first with --backend milvus, or pass "
                                  f"--collection; present: {', '.join(self.client.list_collections()) or 'none'})")
        self.model = _read_model(self.client, name)
        dims = [f.get("params", {}).get("dim") for f in self.client.describe_collection(name).get("fields", [])
                if f.get("name") == "vector"]
        self.dim = int(dims[0] if dims and dims[0] else self.model.get("dim", 0))
        self.client.load_collection(name)
        self.index = _MilvusIndexInfo()
        self._has = {}

    def __len__(self):
        return _count(self.client, self.name)

    def has_image(self, rel):
        if rel not in self._has:
            if len(self._has) > 4096:
                self._has.clear()
            self._has[rel] = bool(self.client.query(self.name, filter=f"image == {quote(rel)}",
                                                    output_fields=["key"], limit=1))
        return self._has[rel]

    def search(self, q, k, folder=None, expr=None):
        parts = [f"({expr})"] if expr else []
        if folder is not None:
            parts.append(f"folder == {quote(folder)}")
        try:
            res = self.client.search(self.name, data=[np.asarray(q[0], np.float32).tolist()], limit=int(k),
                                     filter=" and ".join(parts), output_fields=OUTPUT_FIELDS, anns_field="vector",
                                     search_params={"metric_type": "IP"}, consistency_level=self.consistency)
        except Exception as e:  # noqa: BLE001 - a bad --filter expression comes back as a MilvusException
            raise CollectionError(f"milvus search failed ({_first_line(e)})") from None
        out = []
        for h in res[0]:
            ent = h.get("entity") or {}
            it = dict(ent.get("item") or {}, image=ent.get("image"))
            it.setdefault("source", ent.get("source"))
            out.append((float(h["distance"]), h.get("key", h.get("id")), it))
        return out


def open_store(args, log=None):
    """The search side of args.backend (api.py / webui flags)."""
    if getattr(args, "backend", "faiss") == "milvus":
        prefix = prefix_from_features(args.image_feature) if args.image_feature else None
        return MilvusStore(args.uri, collection_name(args.collection, prefix), token=args.token)
    return FaissStore(args.image_feature, args.image_metadata, args.index, args.ef_search, args.nprobe,
                      save_index=not args.no_save_index, log=log, search_threads=args.search_threads,
                      recall_target=getattr(args, "recall_target", None))
