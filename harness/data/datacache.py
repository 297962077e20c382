"""Decode an image folder once per machine: a uint8 cache on disk that every process memory-maps.

`folder(cache_dir, root, files, stamp, size)` returns the decoded images of an imagefolder
(`sources` lists the files) from `cache_dir/KEY.npy` and `cache_dir/KEY.json`. The key is
a sha256 of everything that decides the pixels: the format version, the resolved root, the
file list with each file's split, label, size and mtime (`stamp`), the side, and the colour
policy (grey when every image is grey, else RGB: decided by the files, so the stamp covers it).
A changed folder gets a new key; the caches of its older contents are removed.

- Written once: the first process takes `KEY.lock` (fcntl.flock, as the source model does),
  decodes, writes the .npy under a temporary name and renames it, then the .json (labels,
  files, content hashes, skipped files, statistics) likewise; the .json is written last, so
  a half-written cache is never read. A second process waits on the lock, then maps the file.
- Read with `np.load(mmap_mode="r")`: a later process pays for the pages it touches, not for
  the folder (no read of the pixels at load).
- Never trusted blindly: a .json of another version or key, a .npy whose header, shape or byte
  size differs from the .json's, or whose sampled rows differ from the digest taken when it
  was written, is rebuilt (the reason goes to `decode.log`).
- Decoded in parallel: one worker process per core this process may use
  (`os.sched_getaffinity`), each `python -m harness.data.datacache` (numpy and PIL only: no torch,
  and not the caller's main module, which a multiprocessing pool would import again), decodes
  interleaved chunks of files straight into the memory-mapped output; each image goes through
  the same `read_image` as the serial path, so the pixels are the same. The pool split's
  statistics come from the workers' per-channel histograms (no second pass over the pixels).

Every decode appends one line to `cache_dir/decode.log` (time, pid, key, images, seconds,
workers), which is how one can tell that a folder was decoded once.
Imports numpy and PIL only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1  # bump when the cache's layout or the decoding changes
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
CHUNK = 32  # consecutive images of one worker
SAMPLE_ROWS = 16  # rows digested to check a cache file against its .json
LOG = "decode.log"


def under(results: Path) -> Path:
    """Where a results folder keeps its decoded data sets."""
    return Path(results) / "cache" / "data"


def content_hash(data: bytes, prefix: bytes = b"") -> str:
    return hashlib.blake2b(prefix + data, digest_size=16).hexdigest()


def read_image(path: Path, mode: str, size: int) -> tuple[np.ndarray, str]:
    """One image as uint8 (C, size, size) and the hash of its decoded native pixels.

    The shorter side is resized to `size` (bilinear, antialiased), then the center is cropped.
    """
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
    digest = content_hash(im.tobytes(), f"{mode} {im.size}|".encode())
    w, h = im.size
    if (w, h) != (size, size):
        if min(w, h) != size:
            scale = size / min(w, h)
            w, h = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    pixels = np.asarray(im, dtype=np.uint8)
    return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)), digest


def colour_mode(paths: list[Path]) -> str:
    """'L' when every readable image is greyscale, else 'RGB' (read from the headers only)."""
    from PIL import Image

    modes = set()
    for path in paths:
        try:
            with Image.open(path) as im:
                modes.add(im.mode)
        except Exception:  # unreadable: reported and skipped when it is decoded
            continue
    return "L" if modes and modes <= GREY_MODES else "RGB"


def pixel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 images (N, C, H, W), in chunks."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for i in range(0, len(x), 64):
        chunk = x[i : i + 64].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk).sum(axis=(0, 2, 3))
    n = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    return (
        tuple(round(float(m), 4) for m in mean),
        tuple(round(max(float(s), 1e-3), 4) for s in std),
    )


def stats_of_histogram(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`pixel_stats` from per-channel counts of each value 0..255 (C, 256), exactly summed."""
    values = np.arange(256, dtype=np.float64) / 255.0
    n = max(1, int(hist[0].sum()))
    mean = hist @ values / n
    std = np.sqrt(np.maximum(hist @ np.square(values) / n - mean**2, 0.0))
    return (
        tuple(round(float(m), 4) for m in mean),
        tuple(round(max(float(s), 1e-3), 4) for s in std),
    )


def _decode_job(job: dict) -> dict:
    """Decode `job["paths"]` into rows `job["rows"]` of the .npy file `job["out"]`.

    Returns, per path, [ok, content hash or why], and the per-channel histogram (C, 256) of
    the rows flagged in `job["counted"]` (the pool split's, for its statistics).
    """
    x = np.load(job["out"], mmap_mode="r+")
    hist = np.zeros((x.shape[1], 256), dtype=np.int64)
    results = []
    for row, path, counted in zip(job["rows"], job["paths"], job["counted"], strict=True):
        try:
            pixels, digest = read_image(Path(path), job["mode"], job["size"])
        except Exception as err:  # corrupt, truncated, not an image: reported and skipped
            results.append([False, f"{type(err).__name__}: {err}"])
            continue
        x[row] = pixels
        if counted:
            for c in range(len(pixels)):
                hist[c] += np.bincount(pixels[c].ravel(), minlength=256)
        results.append([True, digest])
    x.flush()
    del x
    return {"results": results, "hist": hist.tolist()}


def _worker_main() -> None:  # python -m harness.data.datacache: one decode worker, JSON in and out
    import sys

    job = json.load(sys.stdin)
    json.dump(_decode_job(job), sys.stdout)


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def decode(
    paths: list[Path],
    mode: str,
    size: int,
    out: Path,
    workers: int = 1,
    counted: list[bool] | None = None,
) -> tuple[np.ndarray, list, np.ndarray]:
    """Decode every path into a new .npy `out` of shape (len(paths), C, size, size).

    Returns the array (memory-mapped), per path (True, content hash) or (False, why), and the
    per-channel histogram (C, 256) of the images flagged in `counted` (default: all). Rows of
    unreadable files are left zero. `workers` > 1: that many worker processes
    (`python -m harness.data.datacache`, which imports numpy and PIL only) decode interleaved
    chunks of CHUNK files each, straight into the file; each image goes through `read_image`,
    as in the serial path, so the pixels are the same.
    """
    import subprocess
    import sys

    channels = 1 if mode == "L" else 3
    x = np.lib.format.open_memmap(out, "w+", np.uint8, (len(paths), channels, size, size))
    del x  # the workers write through their own maps
    counted = [True] * len(paths) if counted is None else counted
    starts = list(range(0, len(paths), CHUNK))
    workers = max(1, min(workers, len(starts)))
    jobs = []
    for k in range(workers):  # worker k takes chunks k, k + workers, ...: balanced, in order
        rows = [r for s in starts[k::workers] for r in range(s, min(s + CHUNK, len(paths)))]
        jobs.append(
            {
                "out": str(out),
                "mode": mode,
                "size": size,
                "rows": rows,
                "paths": [str(paths[r]) for r in rows],
                "counted": [bool(counted[r]) for r in rows],
            }
        )
    if workers == 1:
        answers = [_decode_job(jobs[0])]
    else:
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parents[2])  # the folder that holds harness/
        env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
        env["OMP_NUM_THREADS"] = "1"
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "harness.data.datacache"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                text=True,
            )
            for _ in jobs
        ]
        for proc, job in zip(procs, jobs, strict=True):
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
        answers = []
        for proc in procs:
            text = proc.stdout.read()
            if proc.wait() != 0:
                raise RuntimeError(f"data cache: a decode worker failed (exit {proc.returncode})")
            answers.append(json.loads(text))
    results: list = [None] * len(paths)
    hist = np.zeros((channels, 256), dtype=np.int64)
    for job, answer in zip(jobs, answers, strict=True):
        for row, result in zip(job["rows"], answer["results"], strict=True):
            results[row] = tuple(result)
        hist += np.asarray(answer["hist"], dtype=np.int64)
    return np.load(out, mmap_mode="r+"), results, hist


# --- The cache of one folder. ---
@dataclass(frozen=True)
class Decoded:
    """A decoded folder: `x` (memory-mapped, read-only) and, per split, its rows and records."""

    x: np.ndarray  # uint8 (N, C, S, S)
    splits: dict  # split -> {"start", "count", "labels", "files", "hashes", "skipped"}
    mode: str  # "L" or "RGB"
    mean: tuple[float, ...]  # the statistics of the pool split (train/ or the whole folder)
    std: tuple[float, ...]
    key: str
    path: Path  # the .npy file
    built_now: bool  # decoded by this call (False: mapped from the cache)

    def split(self, name: str) -> np.ndarray:
        s = self.splits[name]
        return self.x[s["start"] : s["start"] + s["count"]]


def folder_key(root: Path, stamp: str, size: int) -> str:
    blob = json.dumps(
        {
            "version": FORMAT_VERSION,
            "root": str(Path(root).resolve()),
            "files": stamp,  # split, path, label, size and mtime of every file
            "size": size,
            "colour": "grey if every image is grey, else RGB",
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _sample_digest(x: np.ndarray) -> str:
    rows = np.unique(np.linspace(0, len(x) - 1, min(len(x), SAMPLE_ROWS)).astype(np.int64))
    h = hashlib.blake2b(digest_size=16)
    for i in rows.tolist() if len(x) else []:
        h.update(np.ascontiguousarray(x[i]).tobytes())
    return h.hexdigest()


def _read(npy: Path, meta_path: Path, key: str) -> tuple[Decoded | None, str]:
    """The cached folder, or None and why not."""
    if not meta_path.is_file():
        return None, "no cache"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != FORMAT_VERSION or meta.get("key") != key:
            return None, f"another version or key ({meta.get('version')}, {meta.get('key')})"
        if npy.stat().st_size != meta["bytes"]:
            return None, f"size {npy.stat().st_size} bytes, written {meta['bytes']}"
        x = np.load(npy, mmap_mode="r")
        if x.dtype != np.uint8 or list(x.shape) != meta["shape"]:
            return None, f"shape {x.shape} {x.dtype}, written {meta['shape']} uint8"
        if _sample_digest(x) != meta["sample"]:
            return None, "its pixels differ from the digest written with it"
        decoded = Decoded(
            x,
            meta["splits"],
            meta["mode"],
            tuple(meta["mean"]),
            tuple(meta["std"]),
            key,
            npy,
            built_now=False,
        )
        return decoded, ""
    except Exception as err:  # unreadable json, bad .npy header, missing keys: rebuild
        return None, f"unreadable ({type(err).__name__}: {err})"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _log(cache_dir: Path, line: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(cache_dir / LOG, "a") as f:
        f.write(f"{stamp} pid={os.getpid()} {line}\n")


def _drop_older(cache_dir: Path, root: str, size: int, key: str) -> None:
    """Remove the caches of this folder at this size built from earlier contents."""
    for meta_path in cache_dir.glob("*.json"):
        if meta_path.stem == key:
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except Exception:
            continue
        if meta.get("root") == root and meta.get("size") == size:
            meta_path.unlink(missing_ok=True)  # first: a reader then never trusts the .npy
            (cache_dir / f"{meta_path.stem}.npy").unlink(missing_ok=True)
            (cache_dir / f"{meta_path.stem}.lock").unlink(missing_ok=True)


def folder(
    cache_dir: Path,
    root: Path,
    files: dict[str, list[tuple[Path, int]]],
    stamp: str,
    size: int,
    workers: int | None = None,
) -> Decoded:
    """The decoded folder from the cache; decoded (once per machine, under a lock) when missing.

    `files`: per split, (path, class index) in order; `stamp`: the digest of that listing with
    sizes and mtimes. `workers`: decode processes (default: the cores this process may use).
    The "pool" split (train/, or all of a flat folder) gives the statistics.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = folder_key(root, stamp, size)
    npy, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    decoded, why = _read(npy, meta_path, key)
    if decoded is not None:
        return decoded
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the file
        decoded, why = _read(npy, meta_path, key)
        if decoded is not None:
            return decoded
        meta_path.unlink(missing_ok=True)  # from here on no reader trusts the old .npy
        return _build(cache_dir, key, root, files, size, workers, why)


def _build(cache_dir: Path, key: str, root: Path, files, size: int, workers, why: str) -> Decoded:
    started = time.perf_counter()
    workers = default_workers() if workers is None else max(1, workers)
    order = list(files.items())
    paths = [p for _, entries in order for p, _ in entries]
    pool_name = "train" if "train" in files else "all"
    counted = [name == pool_name for name, entries in order for _ in entries]
    tmp = cache_dir / f".{key}.{os.getpid()}.npy"
    mode = colour_mode(paths)
    try:
        x, results, hist = decode(paths, mode, size, tmp, workers, counted)
    except BaseException:  # a failed worker, an interrupt: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    ok = np.asarray([good for good, _ in results], dtype=bool)
    if not ok.all():  # compact: the readable images only, in order
        tmp2 = cache_dir / f".{key}.{os.getpid()}.compact.npy"
        kept = np.flatnonzero(ok)
        y = np.lib.format.open_memmap(tmp2, "w+", np.uint8, (len(kept), *x.shape[1:]))
        for i in range(0, len(kept), 256):
            y[i : i + 256] = x[kept[i : i + 256]]
        y.flush()
        del x, y
        os.replace(tmp2, tmp)
        x = np.load(tmp, mmap_mode="r")
    splits, row, at = {}, 0, 0
    root_path = Path(root)
    for name, entries in order:
        labels, rel, hashes, skipped = [], [], [], []
        for path, label in entries:
            good, what = results[at]
            at += 1
            if good:
                labels.append(int(label))
                rel.append(path.relative_to(root_path).as_posix())
                hashes.append(what)
            else:
                skipped.append([str(path), what])
        splits[name] = {
            "start": row,
            "count": len(labels),
            "labels": labels,
            "files": rel,
            "hashes": hashes,
            "skipped": skipped,
        }
        row += len(labels)
    mean, std = stats_of_histogram(hist)  # of the pool split's readable images
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    sample = _sample_digest(x)
    shape = list(x.shape)
    del x
    os.replace(tmp, cache_dir / f"{key}.npy")
    resolved = str(Path(root).resolve())
    meta = {
        "version": FORMAT_VERSION,
        "key": key,
        "root": resolved,
        "size": size,
        "mode": mode,
        "shape": shape,
        "bytes": (cache_dir / f"{key}.npy").stat().st_size,
        "sample": sample,
        "mean": list(mean),
        "std": list(std),
        "splits": splits,
    }
    _write_json(cache_dir / f"{key}.json", meta)  # last: the cache exists from here on
    seconds = time.perf_counter() - started
    note = "" if why == "no cache" else f"; replaced a cache file: {why}"
    _log(
        cache_dir,
        f"key={key} decoded {len(paths)} images ({int((~ok).sum())} skipped) of {resolved} "
        f"at {size} px in {seconds:.2f} s with {workers} worker(s){note}",
    )
    _drop_older(cache_dir, resolved, size, key)
    decoded, why = _read(cache_dir / f"{key}.npy", cache_dir / f"{key}.json", key)
    if decoded is None:
        raise RuntimeError(f"data cache {key}: unreadable right after writing it: {why}")
    return Decoded(**{**decoded.__dict__, "built_now": True})


if __name__ == "__main__":
    _worker_main()
