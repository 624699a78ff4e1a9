"""The Robust Video Matting (RVM) model adapter: session, recurrent state, pre- and post-processing.

No argv and no Events: ``cuepipe.stages.matting`` drives it frame by frame; on a resident worker
(``--serve``, docs/stages.md) it keeps one ``RVM`` per model and settings loaded across jobs in the
worker's ``cache`` (``reset()`` between clips).

- Providers (``cuepipe.stages.inference``, shared with ``generate``): ``auto`` is CUDA when onnxruntime
  offers it, else CPU; TensorRT only when asked for. A requested GPU provider that is missing - or
  that onnxruntime silently drops when creating the session (it falls back to CPU when CUDA
  libraries are missing) - raises ``StageError(PROVIDER_UNAVAILABLE)``: never a silent CPU run.
  ``RVM.provider`` is the one in use.
- Precision comes from the model's ``src`` input: fp16 models get fp16 ``src`` and states;
  ``downsample_ratio`` is always float32 ``[1]``.
- State: zeros ``[1,1,1,1]`` at the start, ``r*o`` fed back as ``r*i``; reset by ``reset()`` and
  automatically when the frame size or the ratio changes.
- IO binding keeps the states on the device (CUDA) and copies only ``fgr``/``pha`` to the CPU. The
  same code runs with device ``cpu`` (``io_binding=True``), which is how it is tested here: the
  CUDA path itself could not be run on the machine this was written on (no GPU).

Measured on 2 cores at 1280x720: ``InputBuffer.fill`` ~1 ms (``cv2.dnn.blobFromImage`` ~3 ms,
naive numpy ~2-4 ms), ``to_alpha`` ~0.3 ms, ``to_foreground`` ~0.8 ms, against ~60 ms of inference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.inference import device_of, open_session
from cuepipe.stages.stage import StageError

log = logging.getLogger(__name__)

IO_BINDING = ("auto", "on", "off")
_INPUTS = ("src", "r1i", "r2i", "r3i", "r4i", "downsample_ratio")
_OUTPUTS = ("fgr", "pha", "r1o", "r2o", "r3o", "r4o")
_DTYPES: dict[str, type[np.floating[Any]]] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class RVM:
    """One RVM session with its recurrent state; ``infer`` takes and returns float NCHW tensors.

    ``threads`` / ``inter_threads``: onnxruntime intra-/inter-op thread counts (0: its default).
    ``io_binding``: True, False, or None for auto (on for CUDA/TensorRT, off on CPU, where it
    measured no faster). ``spinning``: let idle onnxruntime threads busy-wait (its default; off
    here because decoding and encoding share the cores).
    """

    def __init__(self, model_path: Path, provider: str = "auto", threads: int = 0, inter_threads: int = 0,
                 io_binding: bool | None = None, device_id: int = 0, spinning: bool = False) -> None:
        self.session, ep = open_session(model_path, provider, threads, inter_threads, spinning, device_id)
        self.provider = ep
        self.model_path = Path(model_path)
        self._dtype = self._check_signature()
        self.precision = "fp16" if self._dtype == np.float16 else "fp32"
        self.device = device_of(ep)
        self.io_binding = self.device != "cpu" if io_binding is None else io_binding
        self._device_id = device_id
        self._key: tuple[int, int, float] | None = None
        self._states: list[Any] = []
        self._binding: Any = None

    def _check_signature(self) -> type[np.floating[Any]]:
        ins = {i.name: i.type for i in self.session.get_inputs()}
        outs = {o.name for o in self.session.get_outputs()}
        if set(ins) != set(_INPUTS) or not set(_OUTPUTS) <= outs:
            raise StageError(ErrorKind.MODEL_INVALID,
                             f"{self.model_path} is not an RVM model: inputs {sorted(ins)}, outputs {sorted(outs)}; "
                             f"expected inputs {list(_INPUTS)} and outputs {list(_OUTPUTS)}")
        if ins["src"] not in _DTYPES:
            raise StageError(ErrorKind.MODEL_INVALID, f"{self.model_path}: unsupported src type {ins['src']}")
        return _DTYPES[ins["src"]]

    @property
    def input_dtype(self) -> type[np.floating[Any]]:
        """float32 or float16: what ``src`` must be (give it to ``InputBuffer``)."""
        return self._dtype

    def reset(self) -> None:
        """Forget the recurrent state: the next frame starts a new clip."""
        self._key = None

    def infer(self, src: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
        """One frame: ``src`` [1,3,H,W] RGB 0..1 -> (fgr [3,H,W], pha [H,W]), float, valid until the next call."""
        key = (src.shape[2], src.shape[3], float(ratio))
        if key != self._key:
            if self._key is not None:
                log.info("frame size or ratio changed (%s -> %s): state reset", self._key, key)
            self._key = key
            self._states = [self._zeros() for _ in range(4)]
        ratio_t = np.array([ratio], np.float32)
        if self.io_binding:
            return self._infer_bound(src, ratio_t)
        feeds = {"src": src, "downsample_ratio": ratio_t, **dict(zip(_INPUTS[1:5], self._states, strict=True))}
        fgr, pha, *states = self.session.run(list(_OUTPUTS), feeds)
        self._states = states
        return fgr[0], pha[0, 0]

    def _zeros(self) -> Any:
        zeros = np.zeros((1, 1, 1, 1), self._dtype)
        if not self.io_binding:
            return zeros
        return ort.OrtValue.ortvalue_from_numpy(zeros, self.device, self._device_id)

    def _infer_bound(self, src: np.ndarray, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IO binding: states stay where the provider computes them (the GPU on CUDA)."""
        if self._binding is None:
            self._binding = self.session.io_binding()
        io = self._binding
        io.bind_cpu_input("src", src)
        io.bind_cpu_input("downsample_ratio", ratio)
        for name, state in zip(_INPUTS[1:5], self._states, strict=True):
            io.bind_ortvalue_input(name, state)
        io.bind_output("fgr", "cpu")
        io.bind_output("pha", "cpu")
        for name in _OUTPUTS[2:]:
            io.bind_output(name, self.device, self._device_id)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        self._states = list(outputs[2:6])
        return outputs[0].numpy()[0], outputs[1].numpy()[0, 0]


class InputBuffer:
    """BGR uint8 HxWx3 -> RGB [1,3,H,W] 0..1 in a reused buffer (float32, or float16 for fp16 models)."""

    def __init__(self, width: int, height: int, dtype: type[np.floating[Any]] = np.float32) -> None:
        self.array = np.empty((1, 3, height, width), dtype)
        self._scale = np.float32(1.0 / 255.0)
        self._planes = [np.empty((height, width), np.uint8) for _ in range(3)]

    def fill(self, frame: np.ndarray) -> np.ndarray:
        """Convert ``frame`` into ``self.array`` (returned)."""
        cv2.split(frame, self._planes)
        for c in range(3):  # RGB order from BGR planes
            np.multiply(self._planes[2 - c], self._scale, out=self.array[0, c], casting="unsafe")
        return self.array


def to_alpha(pha: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Alpha [H,W] 0..1 -> uint8 HxW, rounded to nearest and clipped."""
    return cv2.convertScaleAbs(_f32(pha), out, 255.0)


def to_foreground(fgr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Foreground [3,H,W] RGB 0..1 -> BGR uint8 HxWx3, rounded to nearest and clipped."""
    planes = [cv2.convertScaleAbs(_f32(fgr[c]), None, 255.0) for c in (2, 1, 0)]
    return cv2.merge(planes, out)


def _f32(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.float32 else a.astype(np.float32)


class SceneCut:
    """Detects hard cuts so the recurrent state does not carry one shot's person into the next.

    Metric: the mean absolute difference, in 0..1, between consecutive frames shrunk to a 64x36
    gray thumbnail (area average; ~1 ms per 720p frame, in the reader thread). On the synthetic
    demo clips a moving person scores <= 0.01 and a cut between two clips 0.11-0.15; camera motion
    in real footage scores higher than a still camera. ``threshold`` is that difference (a cut
    when exceeded); 0 turns detection off. 0.08 is a reasonable start.
    """

    SIZE = (64, 36)

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._previous: np.ndarray | None = None
        self.last_score = 0.0

    def __call__(self, frame: np.ndarray) -> bool:
        """True when ``frame`` starts a new shot (never for the first frame)."""
        if self.threshold <= 0:
            return False
        thumb = cv2.cvtColor(cv2.resize(frame, self.SIZE, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
        previous, self._previous = self._previous, thumb
        if previous is None:
            return False
        self.last_score = float(cv2.norm(thumb, previous, cv2.NORM_L1)) / (thumb.size * 255.0)
        return self.last_score > self.threshold
