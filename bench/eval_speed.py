"""Wall time and peak memory of metrics.verification / metrics.retrieval on random structured embeddings.

    python bench/eval_speed.py                                   # 5,000 images x 25,000 captions, D=512
    python bench/eval_speed.py --n_img 50000 --n_cap 250000 --skip_retrieval --progress
    python bench/eval_speed.py --n_img 2000 --n_cap 10000 --block 1048576 --threads 1

Identities have a random centre; images and captions are centre + noise, unit norm, so positives score higher
than negatives (EER around 12%, like the seed's teacher: a realistic spread of scores, not all ties). Peak RSS is
the process's high-water mark (resource.getrusage), which includes the embeddings themselves (reported
separately). CPU time is reported beside wall time: on a shared machine wall time mostly measures the neighbours.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import metrics  # noqa: E402


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("metrics speed benchmark", add_help=add_help)
    p.add_argument("--n_img", type=int, default=5000)
    p.add_argument("--n_cap", type=int, default=25000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--imgs_per_id", type=int, default=5, help="images per identity")
    p.add_argument("--noise", type=float, default=3.0, help="noise / centre norm ratio (larger = harder)")
    p.add_argument("--block", type=int, default=metrics.DEFAULT_BLOCK, help="scores held at once")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip_retrieval", action="store_true", help="time verification only")
    p.add_argument("--progress", action="store_true", help="print verification progress (large sizes take minutes)")
    p.add_argument("--seed", type=int, default=0)
    return p


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_data(n_img, n_cap, dim, imgs_per_id, noise, seed, chunk=1 << 16):
    """float16 unit vectors (what the teacher cache stores), generated in chunks to keep the peak low."""
    g = torch.Generator().manual_seed(seed)
    n_id = max(1, n_img // imgs_per_id)
    img_pids = torch.arange(n_img) % n_id
    cen = torch.nn.functional.normalize(torch.randn(n_id, dim, generator=g), dim=1)
    cap_img = torch.sort(torch.randint(0, n_img, (n_cap,), generator=g)).values  # captions spread over images
    cap_img[:min(n_img, n_cap)] = torch.arange(min(n_img, n_cap))  # every image gets a caption when it can
    cap_img = torch.sort(cap_img).values

    def emb(pids, n):
        out = torch.empty(n, dim, dtype=torch.float16)
        for i in range(0, n, chunk):
            p = pids[i:i + chunk]
            x = cen[p] + noise * torch.randn(len(p), dim, generator=g) / dim ** 0.5
            out[i:i + chunk] = torch.nn.functional.normalize(x, dim=1).half()
        return out

    img = emb(img_pids, n_img)
    cap = emb(img_pids[cap_img], n_cap)
    return img.numpy(), cap.numpy(), cap_img.numpy(), img_pids.numpy(), img_pids[cap_img].numpy()


def main(args):
    if min(args.n_img, args.n_cap, args.dim, args.imgs_per_id, args.block) < 1:
        raise SystemExit("error: --n_img, --n_cap, --dim, --imgs_per_id and --block must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    img, cap, cii, ip, cp = make_data(args.n_img, args.n_cap, args.dim, args.imgs_per_id, args.noise, args.seed)
    print(f"data: {args.n_img} images x {args.n_cap} captions, D={args.dim}, {ip.max() + 1} identities, "
          f"float16 ({(img.nbytes + cap.nbytes) / 2**20:.0f} MiB), made in {time.time() - t0:.1f}s; "
          f"torch threads {torch.get_num_threads()}, block {args.block}")
    base = peak_rss_mib()
    print(f"peak RSS after making the data: {base:.0f} MiB")

    t0, c0 = time.time(), time.process_time()
    v = metrics.verification(img, cap, cii, ip, cp, block=args.block, progress=args.progress)
    tv, cv = time.time() - t0, time.process_time() - c0
    print(metrics.format_verification_table(v))
    print(f"verification: {tv:.2f}s wall, {cv:.2f}s CPU, {v['verify_count'] / tv / 1e6:.0f} M pairs/s, "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    if not args.skip_retrieval:
        for name, q, qp, g, gp in (("t2i", cap, cp, img, ip), ("i2t", img, ip, cap, cp)):
            t0, c0 = time.time(), time.process_time()
            r = metrics.retrieval(q, qp, g, gp, block=args.block)
            tr, cr = time.time() - t0, time.process_time() - c0
            print(metrics.format_retrieval(r).splitlines()[1].replace("t2i", name, 1))
            print(f"retrieval {name}: {tr:.2f}s wall, {cr:.2f}s CPU, peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main(argparse.ArgumentParser("eval_speed.py", parents=[get_args_parser()], description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter).parse_args())
