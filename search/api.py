r"""Text -> person search over an enrolled collection, from the command line (and the `Searcher` class).

    cd search
    python api.py --image-root xm_images --image_feature collection/person_features.npy \
        --image_metadata collection/person_metadata.json \
        --queries "a girl wearing red coat" "a man wearing a gray pants" --top-n 2 --model_dir ../export
    # from the repo root, a machine-readable answer:
    python search/api.py --image-root xm_images --image_feature collection/person_features.npy \
        --text-model export/model_text.onnx --queries "穿红色外套的女孩" --top-n 5 --json
    # a Milvus collection (Milvus Lite file or http://host:19530), one camera folder (search/backends.py)
    python search/api.py --backend milvus --uri collection/gallery.db --collection frames --model_dir export \
        --queries "a man in a red coat" --folder cam1

Prints, per query (time = text encoding + index search):
    ----------
    Query: 'a girl wearing red coat'
    	Search completed in 0.0012 seconds.
    1. Score: 0.3819
       Image: xm_images/20250307172329_05dc54fb.png
       BBox: [393, 186, 477, 471]
`--image_metadata` defaults to the partner of `--image_feature` (P_features.npy -> P_metadata.json). The text
model is found by --model_dir, else the folder of --text-model, else the current directory. Exit status 2 with
one `error: ...` line on unusable input (missing files, row/dim mismatch between features, metadata and model).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from search.backends import FaissStore, add_backend_args, open_store  # noqa: E402
from search.charmap import printable  # noqa: E402
from search.collection import CollectionError  # noqa: E402
from search.engine import ExportError, TextEncoder  # noqa: E402
from search.hubness import candidates, rerank  # noqa: E402
from search.index import INDEX_TYPES  # noqa: E402

DEFAULT_FEATURES = "collection/person_features.npy"  # enrolment's default prefix collection/person + _features.npy


def get_data_args_parser(add_help=False):
    """Flags shared by api.py, app_onnx.py and app_siglip.py (seed spellings + snake_case twins)."""
    p = argparse.ArgumentParser("search data", add_help=add_help)
    p.add_argument("--image-root", "--image_root", dest="image_root", default="",
                   help="folder the metadata's image paths are relative to")
    p.add_argument("--image_feature", "--image-feature", dest="image_feature", default=DEFAULT_FEATURES)
    p.add_argument("--image_metadata", "--image-metadata", dest="image_metadata", default=None,
                   help="default: the partner of --image_feature (P_features.npy -> P_metadata.json)")
    p.add_argument("--index", default="auto", choices=INDEX_TYPES)
    p.add_argument("--ef_search", type=int, default=None, help="HNSW efSearch (default 128)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: tuned at build time)")
    p.add_argument("--recall_target", type=float, default=None,
                   help="recall@10 the index's nprobe/efSearch is tuned to at build time (default 0.95)")
    p.add_argument("--no_save_index", action="store_true", help="do not write a (re)built index next to the features")
    p.add_argument("--threads", type=int, default=None, help="text model threads (default 1)")
    p.add_argument("--search_threads", type=int, default=None,
                   help="faiss threads per search (default 1; raise for multi-million-row flat galleries)")
    add_backend_args(p)
    return p


def data_args_problem(args):
    """First problem with the shared search flags (None: fine); api.py and the web UIs refuse it in one line."""
    for k in ("ef_search", "nprobe", "threads", "search_threads"):
        v = getattr(args, k, None)
        if v is not None and v < 1:
            return f"--{k} must be >= 1, got {v}"
    rt = getattr(args, "recall_target", None)
    if rt is not None and not 0 < rt <= 1:  # also refuses nan
        return f"--recall_target must be in (0, 1], got {rt}"
    if getattr(args, "image_root", "") and not os.path.isdir(args.image_root):
        return f"--image-root {args.image_root}: no such folder (the image paths would lead nowhere)"
    return None


def get_onnx_model_args_parser(add_help=False):
    p = argparse.ArgumentParser("onnx text model", add_help=add_help)
    p.add_argument("--text-model", "--text_model", dest="text_model", default=None,
                   help="path of model_text.onnx (model_info.json and input_embeddings.pt.npy beside it)")
    p.add_argument("--model_dir", "--model-dir", dest="model_dir", default=None, help="export folder")
    p.add_argument("--query_filter", "--query-filter", dest="query_filter", type=int, choices=(0, 1), default=1,
                   help="1: strip field labels ('top: red shirt' -> 'red shirt') and leave out the query words "
                        "the student never saw (the export's query_vocab.txt; search/query_words.py); 0: encode the "
                        "query as typed")
    p.add_argument("--hub_weight", "--hub-weight", dest="hub_weight", type=float, default=None,
                   help="rank by cosine - W * the image's hub score (search/hubness.py; needs a collection enrolled "
                        "with the export's query bank); default: the export's weight (0.5); 0: raw cosine")
    return p


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("api", parents=[get_data_args_parser(), get_onnx_model_args_parser()],
                                add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", nargs="+", default=None, help="one or more text queries")
    p.add_argument("--top-n", "--top_n", dest="top_n", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the text report")
    return p


def display(text, limit=200):
    """A query as printed: control characters escaped (no terminal escape injection), long ones shortened."""
    s = printable(text)
    return s if len(s) <= limit else s[:limit] + f"... ({len(text)} characters)"


class Searcher:
    """An encoder (`.encode(texts) -> [B,D]`, `.dim`, `.truncation(text)`, `.space`) over one collection.

        s = Searcher(TextEncoder(model_dir="export"), "collection/p_features.npy", image_root="xm_images")
        s.search("a man in a red coat", top_n=5) -> {"query", "time_s", "notes", "results": [
            {"rank", "score", "row", "image", "path", "bbox", "source", "hub"}, ...]}

    "score" is the raw cosine; with the hubness correction on (hub_weight > 0, search/hubness.py) the results are
    ordered by score - hub_weight * hub instead.
    """

    def __init__(self, encoder, features_path=None, metadata_path=None, image_root="", index="auto", ef_search=None,
                 nprobe=None, save_index=True, log=None, search_threads=None, store=None, folder=None, expr=None,
                 hub_weight=None):
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.encoder = encoder
        self.image_root = image_root or ""
        # the back end (search/backends.py): faiss files by default, or a given store (e.g. backends.MilvusStore)
        self.store = store or FaissStore(features_path, metadata_path, index, ef_search, nprobe, save_index,
                                         self.log, search_threads)
        self.folder, self.expr = folder, expr
        self.collection = c = getattr(self.store, "collection", self.store)
        if encoder.dim != c.dim:
            where = getattr(c, "where", None) or features_path
            raise CollectionError(f"the text model makes {encoder.dim}-dim embeddings but {where} holds "
                                  f"{c.dim}-dim features (enrolled with {c.model.get('kind', '?')} "
                                  f"{c.model.get('space') or c.model.get('teacher') or ''}); use the matching model")
        self.warnings = []
        space = c.model.get("space")
        if space and getattr(encoder, "space", None) and space != encoder.space \
                and not space.endswith(":unknown") and not encoder.space.endswith(":unknown"):
            self.warnings.append(f"warning: the collection was enrolled in space '{space}' but the text model "
                                 f"embeds into '{encoder.space}'; scores may be meaningless")
        self.hub_weight = self._hub_weight(encoder, c.model, hub_weight)
        for w in self.warnings:
            self.log(w)
        self.index = self.store.index

    def _hub_weight(self, encoder, model, asked):
        if asked is not None and not 0 <= asked < 10:  # also refuses nan
            raise CollectionError(f"--hub_weight must be in [0, 10), got {asked}")
        hub = getattr(encoder, "hub", None)
        want = (hub["weight"] if hub else 0.0) if asked is None else float(asked)
        if want <= 0:
            return 0.0
        if hub is None:
            self.warnings.append("warning: --hub_weight needs an export with a query bank (export_model.py writes "
                                 "query_bank.npy when it finds the training data); ranking by raw cosine")
            return 0.0
        if model.get("query_bank_sha256") != hub["sha256"]:
            self.warnings.append("warning: the collection was not enrolled with this export's query bank, so it has "
                                 "no hub scores; ranking by raw cosine (re-enrol with --rebuild for the hubness "
                                 "correction)")
            return 0.0
        return want

    def __len__(self):
        return len(self.store)

    def has_image(self, rel):
        return self.store.has_image(rel)

    def search(self, query, top_n=10, folder=None):
        if not isinstance(query, str):
            raise TypeError("query must be a str")
        top_n = max(1, int(top_n))
        notes = []
        kept, n = self.encoder.truncation(query)
        t0 = time.perf_counter()
        if n == 0:
            notes.append("empty query: nothing to search for")
            results = []
        else:
            prepare = getattr(self.encoder, "prepare", None)
            read = prepare(query) if prepare else query
            if read != query:
                notes.append(f"field labels and words the student never saw were left out; it read: '{display(read)}'")
            if kept < n:
                notes.append(f"query truncated to its first {kept} of {n} characters (the text model's "
                             f"max_seq_length is {kept + 1} tokens including [CLS])")
            q = self.encoder.encode([query])
            k = candidates(top_n) if self.hub_weight else top_n
            hits = self.store.search(q, k, folder if folder is not None else self.folder, self.expr)
            ranked = rerank(hits, self.hub_weight, top_n)
            if [r for _, r, _ in ranked] != [r for _, r, _ in hits[:top_n]]:  # say why scores are not in order
                notes.append(f"ranked by score - {self.hub_weight:g} x hub (hubness correction, search/hubness.py; "
                             "--hub_weight 0 ranks by raw cosine)")
            hits = ranked
            results = []
            for rank, (s, r, it) in enumerate(hits, 1):
                results.append({"rank": rank, "score": float(s), "row": r, "image": it["image"],
                                "path": os.path.join(self.image_root, it["image"]) if self.image_root
                                else it["image"], "bbox": it.get("bbox"), "source": it.get("source"),
                                "hub": it.get("hub")})
        return {"query": query, "time_s": time.perf_counter() - t0, "notes": notes, "results": results}


def format_result(res):
    """The seed's text report for one query."""
    lines = ["----------", f"Query: '{display(res['query'])}'"]
    for n in res["notes"]:
        lines.append(f"\tNote: {n}")
    lines.append(f"\tSearch completed in {res['time_s']:.4f} seconds.")
    for r in res["results"]:
        b = r["bbox"]
        lines.append(f"{r['rank']}. Score: {r['score']:.4f}")
        lines.append(f"   Image: {display(r['path'], limit=1000)}")  # names come from files: no raw escapes
        lines.append(f"   BBox: {[int(round(v)) for v in b] if b is not None else 'None (whole image)'}")
    lines.append("")
    return "\n".join(lines)


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(args):
    try:
        sys.stdout.reconfigure(errors="backslashreplace")  # never die printing a Chinese/emoji query to ASCII
    except (AttributeError, ValueError):
        pass
    if not args.queries:
        fail("pass at least one query: --queries \"a man in a red coat\" ...")
    if args.top_n < 1:
        fail(f"--top-n must be >= 1, got {args.top_n}")
    if data_args_problem(args):
        fail(data_args_problem(args))
    try:
        enc = TextEncoder(args.model_dir, args.text_model, threads=args.threads,
                          filter_queries=bool(args.query_filter))
        store = open_store(args, log=lambda m: print(m, file=sys.stderr, flush=True))
        s = Searcher(enc, args.image_feature, image_root=args.image_root, store=store, folder=args.folder,
                     expr=args.filter, hub_weight=args.hub_weight)
    except (CollectionError, ExportError) as e:
        fail(e)
    try:  # a bad --filter expression is only found out by the engine, at the first search
        s.search("warm-up", 1)  # first ORT run allocates; keep it out of the reported times
        results = [s.search(q, args.top_n) for q in args.queries]
    except CollectionError as e:
        fail(e)
    if args.json:
        doc = {"collection": {"features": args.image_feature, "rows": len(s), "dim": s.collection.dim,
                              "model": s.collection.model, "index": s.index.kind, "backend": s.store.backend},
               "text_model": enc.name, "warnings": s.warnings, "queries": results}
        print(json.dumps(doc, ensure_ascii=False, indent=1, allow_nan=False))
    else:
        for r in results:
            print(format_result(r))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
