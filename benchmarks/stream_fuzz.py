"""Stream fuzzing: every damaged or hostile ``.qft`` stream must end in one clear error.

A tiny seeded hyperprior model (random weights, as the tests') codes small images with
USQ, RDOQ, TCQ-4 and TCQ-8; the streams are mutated — byte flips, truncation, appended
bytes, and above all **forged checksums**: flips anywhere, every header field set to
random, one-bit-off and extreme values (sizes, step, quantizer, tables, fingerprint,
section count and lengths), image sizes with a matching (forged) tables check, swapped or
resized sections — and each is decoded by :meth:`qft.codec.Codec.decompress` in a worker
subprocess (restarted when it dies, with a per-stream time limit). Outcomes:

* ``clear_errors``: one-line :class:`qft.errors.UserError`;
* ``wrong_images``: decoded without a word to an image other than the original's;
* ``tracebacks``: any other exception (its type is counted);
* ``crashes``: the worker died (signal, out of memory) or ran past the time limit.

Goal: all but the first zero. ``identical`` counts mutations that decoded to the original
image (a mutation the format does not depend on, e.g. a NaN payload never read).

    python benchmarks/stream_fuzz.py [--mutations 10000] [--seed 0] [--json benchmarks/results/stream_fuzz.json]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing as mp
import os
import struct
import sys
import time

from pathlib import Path

import numpy as np

# header layout after the 2 magic bytes (qft.codec.container): version, checkpoint, quantizer,
# step, tables, height, width; then the section count
FIELDS = {
    "version": (2, "<B"),
    "checkpoint": (3, "<I"),
    "quantizer": (7, "<B"),
    "step": (8, "<d"),
    "tables": (16, "<I"),
    "height": (20, "<I"),
    "width": (24, "<I"),
    "count": (28, "<B"),
}
SIZES = [(64, 64), (40, 70), (33, 129), (128, 96)]
METHODS = {"usq": {}, "rdoq": {"lam": 0.1}, "tcq4": {"step": 0.6, "lam": 0.05}, "tcq8": {"step": 0.5, "lam": 0.03}}
TIME_LIMIT_S = 60.0


def tiny_codec():
    """The tests' tiny model (seeded random weights, latents large enough for many symbols)."""
    import torch

    from compressai.models import MeanScaleHyperprior

    from qft.codec import Codec

    torch.manual_seed(0)
    m = MeanScaleHyperprior(N=16, M=24).eval()
    with torch.no_grad():
        m.g_a[-1].weight.mul_(30.0)
    m.update(force=True)
    return Codec(m, "tiny", "mean-scale-hyperprior")


def image_digest(x) -> str:
    a = x.mul(255).round().to(dtype=__import__("torch").uint8).numpy()
    return hashlib.sha256(a.tobytes()).hexdigest()[:16] + f"{tuple(a.shape)}"


def _worker(conn) -> None:
    import torch

    from qft.errors import UserError

    torch.set_num_threads(1)
    codec = tiny_codec()
    conn.send("ready")
    while True:
        data = conn.recv_bytes()
        try:
            out = codec.decompress(data)
            result = ("decoded", image_digest(out["x_hat"]))
        except UserError as exc:
            result = ("error", "\n" in str(exc))
        except Exception as exc:  # noqa: BLE001 — what the benchmark counts
            result = ("traceback", type(exc).__name__)
        conn.send(result)


class Worker:
    """A decoding subprocess, restarted after it dies or hangs."""

    def __init__(self):
        self.proc = None
        self.start()

    def start(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        assert self.conn.poll(120) and self.conn.recv() == "ready"

    def decode(self, data: bytes):
        self.conn.send_bytes(data)
        if self.conn.poll(TIME_LIMIT_S):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self.start()
        return ("crash", f"exit {code}")


def mutate(data: bytes, rng: np.random.Generator, codec, sections: list[bytes]) -> tuple[str, bytes]:
    """One mutation of a stream: ``(kind, bytes)``."""
    from qft.codec.container import varint, with_checksum

    body = bytearray(data[:-4])
    kind = int(rng.integers(10))
    if kind == 0:  # byte flips, checksum left alone
        bad = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            bad[int(rng.integers(len(bad)))] ^= int(rng.integers(1, 256))
        return "flip", bytes(bad)
    if kind == 1:  # truncation or appended bytes
        if rng.integers(2):
            return "truncate", data[: int(rng.integers(0, len(data)))]
        return "append", data + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    if kind in (2, 3):  # byte flips with a forged checksum (anywhere / in the payload)
        lo = 0 if kind == 2 else 30
        for _ in range(int(rng.integers(1, 5))):
            body[int(rng.integers(lo, len(body)))] ^= int(rng.integers(1, 256))
        return "flip+crc" if kind == 2 else "payload+crc", with_checksum(body)
    if kind in (4, 5, 6):  # a header field: random, one bit off, or an extreme; forged checksum
        name = list(FIELDS)[int(rng.integers(len(FIELDS)))]
        pos, fmt = FIELDS[name]
        n = struct.calcsize(fmt)
        if kind == 4:
            value = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        elif kind == 5:
            old = int.from_bytes(body[pos : pos + n], "little")
            value = (old ^ (1 << int(rng.integers(8 * n)))).to_bytes(n, "little")
        else:
            extremes = [
                b"\x00" * n,
                b"\xff" * n,
                (1).to_bytes(n, "little"),
                (2**31 if n >= 4 else 128).to_bytes(n, "little"),
            ]
            if fmt == "<d":
                extremes += [
                    struct.pack("<d", v) for v in (float("nan"), float("inf"), -1.0, 1e-300, 1e300, 0.0625, 1024.0)
                ]
            value = extremes[int(rng.integers(len(extremes)))]
        body[pos : pos + n] = value
        return f"header:{name}+crc", with_checksum(body)
    if kind == 7:  # image size with a matching tables check: a consistent, hostile header
        from trellis import Quantizer

        from qft.codec import Container

        h = Container.from_bytes(data).header
        choices = [h.height + int(rng.integers(-70, 70)), int(rng.integers(1, 1 << 15)), h.height ^ 1, 0, 1 << 15]
        height = max(0, choices[int(rng.integers(len(choices)))])
        width = h.width if rng.integers(2) else max(0, h.width + int(rng.integers(-70, 70)))
        q = Quantizer(h.method, step=h.step, reset=h.reset)
        tables = codec._tables(q, height & 0xFFFFFFFF, width & 0xFFFFFFFF)
        body[16:28] = struct.pack("<III", tables, height, width)
        return "size+tables+crc", with_checksum(body)
    # section surgery with a forged checksum: swap, drop, duplicate, resize, lengths lie
    secs = list(sections)
    op = int(rng.integers(5))
    if op == 0:
        secs = secs[::-1]
    elif op == 1:
        secs = secs[: int(rng.integers(len(secs)))]
    elif op == 2:
        secs = secs + [secs[int(rng.integers(len(secs)))]]
    elif op == 3:
        i = int(rng.integers(len(secs)))
        cut = int(rng.integers(0, len(secs[i]) + 1))
        secs[i] = secs[i][:cut] + rng.integers(0, 256, int(rng.integers(0, 16)), dtype=np.uint8).tobytes()
    head = bytes(body[:28])
    lengths = [len(s) for s in secs]
    if op == 4:  # the declared lengths lie, the bytes stay
        lengths = [max(0, n + int(rng.integers(-8, 9))) for n in lengths]
    new = head + bytes([len(secs)]) + b"".join(varint(n) for n in lengths) + b"".join(secs)
    return f"sections:{op}+crc", with_checksum(new)


def main(argv=None) -> int:
    import torch

    from trellis import Quantizer
    from trellis.hardware import machine_info

    from qft.codec import Container

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/stream_fuzz.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    codec = tiny_codec()
    gen = torch.Generator().manual_seed(args.seed)
    streams = []
    for h, w in SIZES:
        x = torch.nn.functional.interpolate(
            torch.rand(1, 3, h // 4 + 1, w // 4 + 1, generator=gen), size=(h, w), mode="bilinear", align_corners=False
        )
        for method, kw in METHODS.items():
            data = codec.compress(x, Quantizer(method, **kw))["bitstream"]
            ref = image_digest(codec.decompress(data)["x_hat"])
            streams.append((f"{method}-{h}x{w}", data, ref, Container.from_bytes(data).sections))
    rng = np.random.default_rng(args.seed)
    worker = Worker()
    counts = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    tracebacks, crashes, wrong, multiline = collections.Counter(), [], [], 0
    t0 = time.perf_counter()
    load = [os.getloadavg()[0]]
    done = 0
    while done < args.mutations:
        name, data, ref, sections = streams[int(rng.integers(len(streams)))]
        kind, bad = mutate(data, rng, codec, sections)
        if bad == data:
            continue
        done += 1
        outcome, detail = worker.decode(bad)
        if outcome == "error":
            key = "clear_errors"
            multiline += bool(detail)
        elif outcome == "decoded":
            key = "identical" if detail == ref else "wrong_images"
            if key == "wrong_images":
                wrong.append({"stream": name, "kind": kind, "bytes": bad.hex()})
        elif outcome == "traceback":
            key = "tracebacks"
            tracebacks[detail] += 1
        else:
            key = "crashes"
            crashes.append({"stream": name, "kind": kind, "detail": detail, "bytes": bad.hex()[:4000]})
        counts[key] += 1
        by_kind[kind.split(":")[0]][key] += 1
        if done % 1000 == 0:
            load.append(os.getloadavg()[0])
            print(f"{done} mutations, {dict(counts)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    worker.proc.kill()
    result = {
        "machine": machine_info() | {"loadavg_1min_during": load},
        "model": "MeanScaleHyperprior N=16 M=24, seeded random weights (tests' tiny model)",
        "streams": [s[0] for s in streams],
        "mutations": done,
        "seed": args.seed,
        "time_limit_s": TIME_LIMIT_S,
        "seconds": time.perf_counter() - t0,
        "counts": {k: counts.get(k, 0) for k in ("clear_errors", "identical", "wrong_images", "tracebacks", "crashes")},
        "multi_line_errors": multiline,
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "traceback_types": dict(tracebacks),
        "wrong_image_examples": wrong[:5],
        "crash_examples": crashes[:5],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["counts"]), f"{result['seconds']:.0f} s")
    return 0 if counts["wrong_images"] == counts["tracebacks"] == counts["crashes"] == multiline == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
