"""GPU encoder throughput: the full-size CONCH (or KEEP) architecture with random weights through
TorchEncoder.encode_images — PIL resize/crop on the CPU into pinned buffers, non-blocking upload,
normalisation on the GPU, bf16 autocast, batch halving on out-of-memory — on N random 448-px tiles.
Needs no weights, no slides and no network: it runs as is on a fresh GPU machine with the repo.

    python benchmarks/bench_gpu_encoder.py --out gpu.json [--model conch|keep] [--tiles 1024]
        [--batch-size 128] [--tile-px 448] [--dtype auto] [--device auto] [--check]
        [--memory-fraction 0.05]

--check also verifies on the device: normalisation on the GPU equals the CPU's bit for bit, and
the GPU embeddings agree with CPU float32 ones (cosine). --memory-fraction caps the GPU memory torch
may use so that a large batch really runs out of memory, to exercise the halving on hardware.
Writes one JSON object to --out (and prints it): tiles/s, batch size asked and used, peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zeus_ray.encoders.base import TorchEncoder  # noqa: E402
from zeus_ray.encoders.registry import (MODELS, default_batch_size, resolve_amp_dtype,  # noqa: E402
                                        resolve_device)


def build(name: str, device, amp_dtype, batch_size: int) -> TorchEncoder:
    """The registered architecture at full size, random weights, in the encoder load_encoder returns."""
    torch.manual_seed(0)
    if name == "conch":
        from zeus_ray.encoders.conch import build_conch
        m = build_conch()
    elif name == "keep":
        from zeus_ray.encoders.keep import build_keep
        m = build_keep()
    else:
        raise SystemExit(f"--model {name!r}: use conch or keep")
    return TorchEncoder(MODELS[name].spec, m, lambda x: m.encode_image(x, normalize=False), None,
                        device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                        model_key=f"{name}@random", logit_scale=m.logit_scale.detach().exp().item())


def check(enc: TorchEncoder, tiles: np.ndarray) -> dict:
    """Device normalisation == CPU normalisation (bit for bit); device embeddings vs CPU float32."""
    from zeus_ray.encoders.preprocess import Preprocessor
    cpu_pre = Preprocessor(enc.spec, "cpu")
    x = cpu_pre.resize_crop(tiles[:8])
    same = torch.equal(enc.preprocess.normalise(torch.from_numpy(np.ascontiguousarray(x)).to(enc.device)).cpu(),
                       cpu_pre.normalise(torch.from_numpy(np.ascontiguousarray(x))))
    dev = enc.encode_images(tiles[:8])
    cpu = TorchEncoder(enc.spec, enc.module, enc._image_fn, None, device="cpu", amp_dtype=None, batch_size=8,
                       model_key=enc.model_key, logit_scale=enc.logit_scale)
    ref = cpu.encode_images(tiles[:8])
    enc.module.to(enc.device)   # TorchEncoder moved the shared module to the CPU
    cos = (dev.astype(np.float64) * ref).sum(1) / np.linalg.norm(dev, axis=1) / np.linalg.norm(ref, axis=1)
    return {"normalise_bit_identical_to_cpu": bool(same), "cosine_vs_cpu_fp32_min": float(cos.min())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--model", default="conch", choices=["conch", "keep"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), bfloat16, float16, float32")
    ap.add_argument("--tiles", type=int, default=1024)
    ap.add_argument("--tile-px", type=int, default=448)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the registry's (128 on CUDA)")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--memory-fraction", type=float, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    device = resolve_device(args.device)
    amp_dtype = resolve_amp_dtype(args.dtype, device)
    batch = args.batch_size or default_batch_size(device)
    cuda = device.type == "cuda"
    if cuda and args.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, device)
    enc = build(args.model, device, amp_dtype, batch)
    tiles = np.random.default_rng(0).integers(0, 256, (args.tiles, args.tile_px, args.tile_px, 3), dtype=np.uint8)

    result = {"model": args.model, "architecture": "random weights, full size", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
              "dtype": str(amp_dtype or torch.float32).replace("torch.", ""), "tiles": args.tiles,
              "tile_px": args.tile_px, "input_px": enc.spec.input_size, "batch_size_asked": batch,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    enc.preprocess.resize_crop(tiles[:min(len(tiles), 64)])
    result["cpu_resize_crop_ms_per_tile"] = (time.perf_counter() - t) / min(len(tiles), 64) * 1e3

    enc.encode_images(tiles[:min(len(tiles), enc.batch_size)])   # warm-up (kernels, pinned buffers)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    emb = enc.encode_images(tiles)   # returns numpy: the GPU work has finished
    seconds = time.perf_counter() - t
    result.update({"seconds": seconds, "tiles_per_s": args.tiles / seconds, "batch_size_used": enc.batch_size,
                   "embedding_shape": list(emb.shape),
                   "unit_norm": bool(np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3))})
    if cuda:
        result["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    if args.check:
        result.update(check(enc, tiles))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
