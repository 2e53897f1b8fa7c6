"""Wall time per stage and peak memory of metrics.evaluate_embeddings (the seed's verification table + text->image
and image->text retrieval, one pass) on random structured embeddings.

    python bench/eval_speed.py                                # 50,000 images x 250,000 captions, D=512, bf16
    python bench/eval_speed.py --precision fp32 bf16          # both, one after the other, same data
    python bench/eval_speed.py --n_img 5000 --n_cap 25000 --threads 1

Target (issue 14): 50k x 250k, all three, <= 60 s on 2 cores, peak RSS <= 4 GB. Identities have a random centre;
images and captions are centre + noise, unit norm, so positives score higher than negatives (EER around 12%, like
the seed's teacher: a realistic spread of scores, not all ties); 5 images per identity, 5 captions per image.
Peak RSS is the process's high-water mark (resource.getrusage), which includes the float16 embeddings themselves
(printed first). CPU time is printed beside wall time: on a shared machine wall time also measures the neighbours
(the load average is printed too).
"""
import os

# as evaluation_model.py / evaluation_labels.py do before torch loads OpenMP: idle GEMM threads sleep instead of
# spinning against the counting threads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import metrics  # noqa: E402


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("metrics speed benchmark", add_help=add_help)
    p.add_argument("--n_img", type=int, default=50000)
    p.add_argument("--n_cap", type=int, default=250000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--imgs_per_id", type=int, default=5, help="images per identity")
    p.add_argument("--noise", type=float, default=3.0, help="noise / centre norm ratio (larger = harder)")
    p.add_argument("--block", type=int, default=metrics.DEFAULT_BLOCK, help="scores held at once")
    p.add_argument("--precision", nargs="+", choices=metrics.PRECISIONS, default=["bf16"],
                   help="score precision(s) to time, one run each on the same data")
    p.add_argument("--threads", type=int, default=0, help="torch / numba threads (0: torch's default)")
    p.add_argument("--progress", action="store_true", help="the evaluation's own estimate and progress bar")
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
    print(f"data: {args.n_img:,} images x {args.n_cap:,} captions = {args.n_img * args.n_cap / 1e9:.2f}G pairs, "
          f"D={args.dim}, {ip.max() + 1:,} identities, float16 ({(img.nbytes + cap.nbytes) / 2**20:.0f} MiB), made "
          f"in {time.time() - t0:.1f}s; torch threads {torch.get_num_threads()}, block {args.block}")
    # compile the numba kernels (cached on disk after the first run) so they are not timed
    t0 = time.time()
    metrics.evaluate_embeddings(*make_data(200, 1000, args.dim, 5, args.noise, 1), block=4096)
    print(f"warm-up (numba compile or cache load): {time.time() - t0:.1f}s; peak RSS so far {peak_rss_mib():.0f} MiB")
    for prec in args.precision:
        load = os.getloadavg()[0]
        t0, c0 = time.time(), time.process_time()
        r = metrics.evaluate_embeddings(img, cap, cii, ip, cp, block=args.block, precision=prec,
                                        progress=args.progress)
        wall, cpu = time.time() - t0, time.process_time() - c0
        tm = r["timing"]
        print(f"\n== precision {prec}: {wall:.1f}s wall, {cpu:.1f}s CPU ({cpu / wall:.2f} cores busy), load average "
              f"{load:.2f} at start / {os.getloadavg()[0]:.2f} at end; peak RSS {peak_rss_mib():.0f} MiB")
        print(f"   stages: prepare {tm['prepare_s']:.1f}s | band pre-pass {tm['band_s']:.1f}s ({tm['band_tiles']} of "
              f"{tm['tiles']} tiles {tm['tile_shape'][0]}x{tm['tile_shape'][1]}) | main pass {tm['pass_s']:.1f}s "
              f"(GEMM {tm['pass_gemm_s']:.1f}s, counting {tm['pass_s'] - tm['pass_gemm_s']:.1f}s) | finish "
              f"{tm['finish_s']:.1f}s (extra tiles {tm['extra_tiles']}); {tm['threads']} threads; "
              f"{args.n_img * args.n_cap / wall / 1e6:.0f}M pairs/s")
        print(metrics.format_verification_table(r["verification"]))
        print(metrics.format_retrieval(r["t2i"], r["i2t"]))


if __name__ == "__main__":
    main(argparse.ArgumentParser("eval_speed.py", parents=[get_args_parser()], description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter).parse_args())
