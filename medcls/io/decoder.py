"""Compressed DICOM pixel data decoded in a separate, limited process.

The decoders behind pydicom (GDCM, pylibjpeg's C and Rust codecs) are native code: on crafted
data they can abort the process (GDCM calls C++ ``terminate``), crash, loop or allocate without
bound, which would stop the server for every user. So compressed (encapsulated) pixel data is
decoded by a worker process with an address-space limit (``RLIMIT_AS``) and a time limit; a
crash, a hang or running out of its memory becomes a :class:`DecoderFailedError` and the worker
is replaced. Native (uncompressed) pixel data never comes here: reading it is plain numpy.

Workers stay warm (a small pool, one per concurrent decode slot) so a slice costs a pipe round
trip, not a Python start-up. Only exception type names cross back from a worker, never messages
(which can quote values from the file).

Protocol on the worker's stdin/stdout: request = ``<QII`` (data length, frame, frame count) +
the file's bytes; answer = ``<I`` header length + a JSON header (``ok``, ``dtype``, ``shape`` or
``kind``) + the frame's raw bytes.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
import time

import numpy as np

from medcls.core.errors import DecoderFailedError
from medcls.core.settings import PROJECT_DIR

_REQUEST = struct.Struct("<QII")
_HEADER = struct.Struct("<I")
#: Address space a worker may add to what it holds after start-up (its imports), in bytes, on top
#: of the decode budget: decoders keep scratch buffers and thread stacks besides the frame.
_HEADROOM = 256 << 20


class DecodeFailure(Exception):
    """Raised in the parent for a decoder's refusal: ``kind`` is "notimplemented" or
    "unsupported" (no decoder for this compression or precision), "damaged" (the data does not
    decode) or "memory" (the worker's limit)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


# ----------------------------------------------------------------------------- parent side

class _Worker:
    def __init__(self, budget: int):
        env = {**os.environ, "MEDCLS_WORKER_BUDGET": str(int(budget)),
               "PYTHONPATH": os.pathsep.join([str(PROJECT_DIR),
                                              os.environ.get("PYTHONPATH", "")])}
        self.budget = budget
        self.proc = subprocess.Popen([sys.executable, "-m", "medcls.io.decoder"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, close_fds=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for fh in (self.proc.stdin, self.proc.stdout):
            try:
                fh.close()
            except OSError:
                pass

    def _read(self, n: int, deadline: float) -> bytearray:
        out = bytearray(n)
        view, got, fd = memoryview(out), 0, self.proc.stdout.fileno()
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            n_read = os.readv(fd, [view[got:]])
            if n_read == 0:
                raise EOFError
            got += n_read
        return out

    def decode(self, data: bytes, frame: int, n_frames: int, timeout: float) -> np.ndarray:
        deadline = time.monotonic() + timeout
        self.proc.stdin.write(_REQUEST.pack(len(data), frame, n_frames))
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        (size,) = _HEADER.unpack(self._read(_HEADER.size, deadline))
        head = json.loads(self._read(size, deadline).decode("ascii"))
        if not head["ok"]:
            raise DecodeFailure(head["kind"])
        dtype, shape = np.dtype(head["dtype"]), tuple(head["shape"])
        raw = self._read(int(np.prod(shape)) * dtype.itemsize, deadline)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


class DecoderPool:
    """Warm worker processes, at most ``size`` idle; a failed worker is killed, not reused."""

    def __init__(self, size: int = 2):
        self.size = size
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def _take(self, budget: int) -> _Worker:
        with self._lock:
            while self._idle:
                w = self._idle.pop()
                if w.alive() and w.budget == budget:
                    return w
                w.kill()
        return _Worker(budget)

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if len(self._idle) < self.size and worker.alive():
                self._idle.append(worker)
                return
        worker.kill()

    def decode(self, data: bytes, frame: int, n_frames: int, budget: int,
               timeout: float) -> np.ndarray:
        """The decoded frame ``frame`` of a DICOM file; raises :class:`DecodeFailure` when the
        decoders refuse the data, :class:`DecoderFailedError` when the worker crashed, hung
        past ``timeout`` seconds or ran out of its memory."""
        worker = self._take(budget)
        try:
            arr = worker.decode(data, frame, n_frames, timeout)
        except DecodeFailure as exc:
            if exc.kind == "memory":
                worker.kill()
                raise DecoderFailedError(
                    "Decoding this DICOM image needed more memory than the decoder is allowed "
                    f"({(budget + _HEADROOM) / 2**30:.1f} GB); the file is probably damaged or "
                    "crafted. It was not opened.") from None
            self._give_back(worker)
            raise
        except TimeoutError:
            worker.kill()
            raise DecoderFailedError(f"Decoding this DICOM image took longer than {timeout:.0f} s, "
                                     "so it was stopped; the file is probably damaged.") from None
        except (EOFError, OSError, ValueError, KeyError):
            worker.kill()
            raise DecoderFailedError("The DICOM image decoder crashed on this file (it runs in a "
                                     "separate process, so nothing else was affected); the file "
                                     "is probably damaged.") from None
        self._give_back(worker)
        return arr

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.kill()


# ----------------------------------------------------------------------------- worker side

def _limit_memory(budget: int) -> None:
    """Cap this process's address space at what it holds now plus the budget and headroom."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return
    limit = vm + budget + _HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _preload_decoders() -> None:
    """Import the pixel decoders before the memory cap, so the cap measures decoding only."""
    import importlib

    import pydicom.pixels  # noqa: F401

    for name in ("pylibjpeg", "openjpeg", "libjpeg", "rle", "gdcm"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional decoder that is not installed
            pass


def _decode(data: bytes, frame: int, n_frames: int) -> np.ndarray:
    import warnings

    from pydicom.pixels import pixel_array

    from medcls.io.dicom_tags import read_dataset

    ds = read_dataset(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = pixel_array(ds, index=frame) if n_frames > 1 else ds.pixel_array
    return np.ascontiguousarray(arr)


def _failure_kind(exc: BaseException) -> str:
    """What went wrong, without the exception's text (which can quote values from the file)."""
    from medcls.io.dicom_tags import is_unsupported_codec

    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, NotImplementedError):
        return "notimplemented"
    if isinstance(exc, Exception) and is_unsupported_codec(exc):
        return "unsupported"
    return "damaged"


def _answer(out, head: dict, payload: bytes | memoryview = b"") -> None:
    text = json.dumps(head).encode("ascii")
    out.write(_HEADER.pack(len(text)) + text)
    if payload:
        out.write(payload)
    out.flush()


def main() -> None:
    budget = int(os.environ.get("MEDCLS_WORKER_BUDGET", 1 << 30))
    _preload_decoders()
    _limit_memory(budget)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        req = inp.read(_REQUEST.size)
        if len(req) < _REQUEST.size:
            return  # the parent went away
        size, frame, n_frames = _REQUEST.unpack(req)
        data = inp.read(size)
        try:
            arr = _decode(data, frame, n_frames)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - incl. pyo3's PanicException
            _answer(out, {"ok": False, "kind": _failure_kind(exc)})
            continue
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        _answer(out, {"ok": True, "dtype": arr.dtype.str, "shape": list(arr.shape)},
                memoryview(arr).cast("B"))


if __name__ == "__main__":
    main()
