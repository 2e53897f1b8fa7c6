"""Embed a dataset with a teacher into the cache that distillation trains from (DESIGN §3, embedding_cache.py).

Fields: image (the pixels; for the attribute teacher the ground-truth attributes), caption (caption_rows order;
a non-multilingual teacher embeds zh rows through their English pivot_text), attributes and prompt_caption (rows
of records that have them; the others stay not-done). Resumable: rows already done are skipped; each batch's rows
are written in place and synced, then their bytes of the done mask are set in place (never the whole mask), so a
kill -9 loses at most one batch and a batch costs the same at 10k rows and at 12M. Records come from the
memory-mapped record store (record_store.py), built on first use; build it once beforehand with
`python data.py --data X.json --index` for big datasets.

Single GPU (or CPU):
  python tools/extract_label.py --data SYNTH-PEDES/synthpedes-dataset.json --embedding_path embeddings
  python tools/extract_label.py --data data.json --embedding_path emb --teacher /models/siglip2-so400m-patch16-512
Offline attribute teacher (packaged all-MiniLM-L6-v2, no download):
  python tools/extract_label.py --data data.json --embedding_path embeddings --teacher attributes
Several GPUs, one node (rank r of world w embeds rows i % w == r into the same files):
  torchrun --nproc_per_node=4 tools/extract_label.py --data SYNTH-PEDES/synthpedes-dataset.json \
      --embedding_path embeddings
Several nodes (the same command on every node, --node_rank 0..N-1; rows are sharded over all nnodes x nproc
ranks by global rank; --embedding_path and the record store must be on a filesystem every node sees, e.g. NFS):
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 \
      --rdzv_id=extract1 tools/extract_label.py --data /shared/SYNTH-PEDES/synthpedes-dataset.json \
      --embedding_path /shared/embeddings
Custom-code teacher:
  python tools/extract_label.py --data data.json --embedding_path emb_mexma --teacher visheratin/mexma-siglip2 \
      --trust_remote_code
"""
import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or oversubscribed CPU,
# spinning made small training steps up to 13x slower (bench/speed.py); on a dedicated GPU box it costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import data
import record_store
from cli import fail
from embedding_cache import FIELDS, CacheMismatchError, EmbeddingCache, summary, verify
from teachers import DEFAULT_TEACHER, TeacherLoadError, attribute_text, load_teacher


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("extract teacher embeddings", add_help=add_help)
    p.add_argument("--data", required=True, help="dataset JSON (SYNTH-PEDES, CUHK-PEDES reid_raw.json, RSTPReid)")
    p.add_argument("--embedding_path", default="embeddings", help="cache folder (created, or resumed)")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="hub id, local model folder, or attributes[:<dir>]")
    p.add_argument("--image_root", default=None, help="image folder (default: the JSON's folder)")
    p.add_argument("--record_store", default=None, help="record store folder (record_store.py; default "
                   "<json stem>.records beside the JSON, built on first use)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--fields", default=",".join(FIELDS), help=f"comma list of {','.join(FIELDS)}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="teacher precision; auto = bf16/fp16 on CUDA, fp32 on CPU")
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom model code (mexma-siglip2)")
    p.add_argument("--workers", type=int, default=4, help="image loading/preprocessing processes")
    p.add_argument("--max_batches", type=int, default=0, help="stop after this many batches (0 = all); "
                   "re-run to resume - for tests and for splitting a long extraction into slots")
    return p


class ImageRows(Dataset):
    """(row, PIL image or None, status) for the image rows still to embed."""

    def __init__(self, paths, rows):
        self.paths, self.rows = paths, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        img = data.load_image(self.paths[row])
        if img is not None:
            return row, img, "ok"
        return row, None, "missing" if not os.path.exists(self.paths[row]) else "corrupt"


class CollateImages:
    """Runs the teacher's preprocessing inside the worker, so the main process only feeds the GPU."""

    def __init__(self, image_inputs):
        self.image_inputs = image_inputs

    def __call__(self, batch):
        ok = [(r, im) for r, im, s in batch if s == "ok"]
        n_missing = sum(s == "missing" for _, _, s in batch)
        n_corrupt = sum(s == "corrupt" for _, _, s in batch)
        inputs = self.image_inputs([im for _, im in ok]) if ok else None
        return [r for r, _ in ok], inputs, n_missing, n_corrupt


class FieldInputs:
    """What to embed for one field, read from the record store on demand (a dict of 12M caption strings per rank
    would cost gigabytes): `rows` int64, the rows that have an input; inputs[row] is a text, or an image path for the
    image field of an image teacher. Rows not in `rows` (no attributes / prompt_caption) stay not-done."""

    def __init__(self, store, field, teacher):
        self.store = store
        if field == "caption":  # an English-only teacher embeds a zh caption through its parallel English one
            self.kind, self.rows = ("caption" if teacher.multilingual else "pivot"), np.arange(store.n_captions)
        elif field == "image" and teacher.kind != "attributes":
            self.kind, self.rows = "path", np.arange(len(store))
        elif field in ("image", "attributes"):  # the attribute teacher's image is the text of its attributes
            has = store.nonempty("attributes")
            self.kind = "attributes"
            self.rows = np.array([i for i in np.flatnonzero(has).tolist()
                                  if attribute_text(store.optional("attributes", i))], dtype=np.int64)
        else:
            self.kind, self.rows = "prompt_caption", np.flatnonzero(store.nonempty("prompt_caption"))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, row):
        s, row = self.store, int(row)
        if self.kind == "path":
            return s.image_path(row)
        if self.kind == "caption":
            return s.caption_text(row)
        if self.kind == "pivot":
            return s.caption_text(s.pivot_rows([row])[0])
        if self.kind == "attributes":
            return attribute_text(s.optional("attributes", row))
        return s.optional("prompt_caption", row)


def embed_unique(teacher, texts):
    """Embed each distinct text once: an English-only teacher sees every zh caption as its English pivot, which
    sits in the same batch, so this halves the caption work there."""
    pos = {}
    idx = [pos.setdefault(t, len(pos)) for t in texts]
    return teacher.embed_texts(list(pos))[idx]


def main(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    fields = [f.strip() for f in args.fields.split(",") if f.strip()]
    bad = [f for f in fields if f not in FIELDS]
    if bad or not fields:
        fail(f"--fields {args.fields!r}: each must be one of {','.join(FIELDS)}")
    if args.batch_size < 1 or args.workers < 0 or args.max_batches < 0:
        fail("--batch_size must be >= 1, --workers and --max_batches >= 0")
    try:
        sha = data.dataset_hash(args.data)
    except FileNotFoundError:
        fail(f"{args.data}: no such file")
    except OSError as e:
        fail(f"{args.data}: cannot read ({e})")
    try:  # a cache of other data or another teacher: refuse now, before building the store or loading a big model
        verify(args.embedding_path, dict(dataset_sha256=sha, teacher=args.teacher))
        # the memory-mapped record store (record_store.py), built here on first use by each node's local rank 0
        store = record_store.ensure(args.data, args.image_root, args.record_store, builder=local_rank == 0,
                                    progress=rank == 0, sha=sha)
        n = len(store)
        counts = dict(image=n, caption=store.n_captions, attributes=n, prompt_caption=n)
        verify(args.embedding_path, dict(dataset_sha256=sha, counts=counts, teacher=args.teacher))
    except CacheMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except data.DatasetError as e:
        fail(f"{e}")

    device = args.device
    if world > 1:
        if torch.cuda.is_available() and device in ("auto", "cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    try:
        teacher = load_teacher(args.teacher, device, None if args.dtype == "auto" else args.dtype,
                               args.trust_remote_code)
    except TeacherLoadError as e:
        fail(f"{e}")
    zh = "embedded directly" if teacher.multilingual else "embedded as pivot_text (the parallel English caption)"
    manifest = dict(teacher=args.teacher, teacher_kind=teacher.kind, logit_scale=teacher.logit_scale,
                    logit_bias=teacher.logit_bias, dataset=os.path.abspath(args.data), dataset_sha256=sha,
                    multilingual=teacher.multilingual,
                    preprocessing=dict(teacher.preprocessing, zh_captions=zh,
                                       attributes="non-'unknown' fields joined with ', '"))
    shard = rank if world > 1 else None
    # rank 0 creates the files; the others open them after the barrier. Rank 0's verdict is broadcast so a
    # refused cache stops every rank instead of leaving them waiting.
    err, cache = None, None
    if rank == 0:
        try:
            cache = EmbeddingCache.create(args.embedding_path, manifest, counts, teacher.dim, shard=shard)
        except CacheMismatchError as e:
            err = str(e)
    if world > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
        if err is None and rank != 0:
            cache = EmbeddingCache.create(args.embedding_path, manifest, counts, teacher.dim, shard=shard)
    if err is not None:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)

    computed = {f: 0 for f in FIELDS}
    eligible = {}
    n_missing = n_corrupt = n_batches = 0
    stopped = False
    for field in FIELDS:
        inputs = FieldInputs(store, field, teacher)
        eligible[field] = len(inputs)
        if field not in fields or stopped:
            continue
        done = cache.done(field)
        rows = inputs.rows  # rank r of world w embeds rows i % w == r, over every node (RANK/WORLD_SIZE are global)
        pending = rows[~done[rows] & (rows % world == rank)]  # int64: 8 bytes a row, not a Python int
        bar = tqdm(total=len(pending), desc=f"{field}", unit="row", disable=rank != 0 or not len(pending),
                   dynamic_ncols=True)
        if field == "image" and teacher.kind != "attributes":
            loader = DataLoader(ImageRows(inputs, pending), batch_size=args.batch_size, shuffle=False,
                                num_workers=args.workers, collate_fn=CollateImages(teacher.image_inputs))
            batches = iter(loader)
        else:
            batches = ((pending[b:b + args.batch_size].tolist(), None, 0, 0)
                       for b in range(0, len(pending), args.batch_size))
        for rows, image_inputs, nm, nc in batches:
            if args.max_batches and n_batches >= args.max_batches:
                stopped = True
                break
            if image_inputs is not None:
                emb = teacher.embed_image_inputs(image_inputs)
            elif rows:
                emb = embed_unique(teacher, [inputs[i] for i in rows])
            if rows:
                cache.write(field, rows, emb)
            computed[field] += len(rows)
            n_missing, n_corrupt, n_batches = n_missing + nm, n_corrupt + nc, n_batches + 1
            bar.update(len(rows) + nm + nc)
        bar.close()
        del batches  # shuts down the loader's workers before the next field

    if world > 1:
        t = torch.tensor([computed[f] for f in FIELDS] + [n_missing, n_corrupt], dtype=torch.long,
                         device=teacher.device if dist.get_backend() == "nccl" else "cpu")  # nccl: CUDA tensors only
        dist.all_reduce(t)
        *c, n_missing, n_corrupt = t.tolist()
        computed = dict(zip(FIELDS, c))
        dist.barrier()  # every rank's rows are written before rank 0 folds the done masks
        if rank == 0:
            cache.merge_done()
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        if n_missing or n_corrupt:
            print(data.format_skip_summary(n_missing, n_corrupt) + " (their rows stay not-done)")
        print("computed: " + "  ".join(f"{f} {computed[f]}" for f in FIELDS))
        if stopped:
            print(f"stopped after {args.max_batches} batches (--max_batches); re-run to resume")
        reader = EmbeddingCache.open(args.embedding_path)
        print(summary(reader, eligible))
    return dict(computed=computed, eligible=eligible, n_missing=n_missing, n_corrupt=n_corrupt, stopped=stopped)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except KeyboardInterrupt:
        print("interrupted: finished batches are saved; re-run the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
