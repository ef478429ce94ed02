"""Retrieval recall at scale: N random audio / visual embedding pairs, ranked in blocks on the mesh.

Prints the wall time of recall@1/5/10 both ways (``cavmae_jax/retrieval.py``) and the peak
resident memory of the process; the N x N similarity matrix is never built (at 100,000 clips it
would take 40 GB in float32, 80 GB in float64).

    python bench/retrieval_scale.py                    # 100,000 pairs, 768-d
    python bench/retrieval_scale.py --clips 20000 --block 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--block", type=int, default=512)
    args = parser.parse_args()
    import jax

    from cavmae_jax import retrieval

    rng = np.random.default_rng(0)
    audio = rng.standard_normal((args.clips, args.dim), np.float32)
    visual = audio + 2.0 * rng.standard_normal((args.clips, args.dim), np.float32)
    before_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    start = time.perf_counter()
    result = retrieval.recall(audio, visual, block=args.block)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"devices: {jax.devices()}")
    print(
        json.dumps(
            {
                "clips": args.clips,
                "dim": args.dim,
                "block": args.block,
                "seconds": round(seconds, 1),
                "peak_rss_gb": round(peak_gb, 2),
                "rss_gb_before_ranking": round(before_gb, 2),
                "a2v_r1": result["a2v_r1"],
                "v2a_r1": result["v2a_r1"],
            }
        )
    )


if __name__ == "__main__":
    main()
