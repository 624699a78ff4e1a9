"""ONNX Runtime sessions for every model stage: one place for provider choice and session options.

    from cuepipe.stages.inference import open_session
    session, provider = open_session("model.onnx", provider="auto", threads=0)

Rules, the same for every stage (``docs/stages.md``):

- ``provider`` is one of ``PROVIDERS``. ``auto`` is CUDA when onnxruntime offers it, else the CPU;
  TensorRT only when asked for by name.
- A requested GPU provider that this onnxruntime lacks raises ``StageError(PROVIDER_UNAVAILABLE)``
  (never a silent CPU run). So does one that onnxruntime lists but then drops while creating the
  session (it falls back to the CPU when the CUDA libraries are missing): after creating it,
  ``session.get_providers()[0]`` must be the provider asked for.
- A model file that does not exist raises MODEL_MISSING; one onnxruntime cannot load, MODEL_INVALID.
- Session options: ``ORT_ENABLE_ALL`` graph optimisation (~1.2-1.3x faster than EXTENDED on RVM),
  ``threads`` / ``inter_threads`` intra- and inter-op threads (0: onnxruntime's default, one per
  core), and idle threads that sleep instead of spinning unless ``spinning``: decoding and encoding
  run in other threads and ffmpeg processes on the same cores.

The provider name returned (e.g. ``CPUExecutionProvider``) is what stages report in ``started``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.stage import PROVIDERS, StageError

__all__ = ["EXECUTION_PROVIDERS", "ORT_ERRORS", "PROVIDERS", "choose_provider", "device_of", "open_session",
           "session_options"]

log = logging.getLogger(__name__)

#: ``provider`` parameter value -> onnxruntime execution provider name
EXECUTION_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                       "tensorrt": "TensorrtExecutionProvider"}
_DEVICES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
# onnxruntime's load errors share no base class below Exception; these are the ones a bad file raises.
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, n)
    for n in ("Fail", "InvalidProtobuf", "NoSuchFile", "InvalidGraph", "InvalidArgument", "NotImplemented",
              "RuntimeException")
    if hasattr(ort.capi.onnxruntime_pybind11_state, n)
)


def choose_provider(provider: str, available: Sequence[str] | None = None) -> str:
    """The execution provider for ``provider`` (auto/cpu/cuda/tensorrt) among ``available`` (default:
    this onnxruntime's). BAD_ARGUMENT for an unknown name, PROVIDER_UNAVAILABLE for a missing one."""
    available = list(ort.get_available_providers() if available is None else available)
    if provider not in PROVIDERS:
        raise StageError(ErrorKind.BAD_ARGUMENT, f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    if provider == "auto":
        cuda = EXECUTION_PROVIDERS["cuda"]
        return cuda if cuda in available else EXECUTION_PROVIDERS["cpu"]
    wanted = EXECUTION_PROVIDERS[provider]
    if wanted not in available:
        raise StageError(ErrorKind.PROVIDER_UNAVAILABLE, unavailable_message(wanted, available))
    return wanted


def unavailable_message(wanted: str, available: Sequence[str]) -> str:
    """Why ``wanted`` cannot be used, and what to do about it."""
    return (f"{wanted} is not available in this onnxruntime (available: {', '.join(available)}). "
            "For CUDA/TensorRT install the GPU build in place of the CPU one: "
            "pip uninstall onnxruntime && pip install onnxruntime-gpu (it needs matching CUDA/cuDNN "
            "libraries); or run with --provider cpu")


def device_of(provider_name: str) -> str:
    """``cpu`` or ``cuda``: where a provider keeps its tensors (for IO binding)."""
    return _DEVICES.get(provider_name, "cpu")


def session_options(threads: int = 0, inter_threads: int = 0, spinning: bool = False) -> ort.SessionOptions:
    """The stages' session options (module docstring)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = inter_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def open_session(model_path: Path | str, provider: str = "auto", threads: int = 0, inter_threads: int = 0,
                 spinning: bool = False, device_id: int = 0) -> tuple[ort.InferenceSession, str]:
    """Create a session for ``model_path`` on ``provider``: (session, the execution provider in use).

    Raises ``StageError``: MODEL_MISSING (no such file), MODEL_INVALID (onnxruntime cannot load it),
    PROVIDER_UNAVAILABLE (the provider is missing or onnxruntime fell back from it), BAD_ARGUMENT.
    """
    path = Path(model_path)
    ep = choose_provider(provider)
    if not path.is_file():
        raise StageError(ErrorKind.MODEL_MISSING, f"model file {path} does not exist")
    providers: list[Any] = [(ep, {"device_id": device_id})] if ep != EXECUTION_PROVIDERS["cpu"] else []
    cuda = EXECUTION_PROVIDERS["cuda"]
    if ep == EXECUTION_PROVIDERS["tensorrt"] and cuda in ort.get_available_providers():
        providers.append((cuda, {"device_id": device_id}))  # for the nodes TensorRT does not take
    providers.append(EXECUTION_PROVIDERS["cpu"])
    try:
        session = ort.InferenceSession(str(path), session_options(threads, inter_threads, spinning),
                                       providers=providers)
    except ORT_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(ErrorKind.MODEL_INVALID, f"{path}: onnxruntime cannot load it: {first}") from None
    in_use = session.get_providers()
    if not in_use or in_use[0] != ep:  # e.g. CUDA listed but its libraries missing: ORT fell back
        raise StageError(ErrorKind.PROVIDER_UNAVAILABLE,
                         f"{ep} was requested but onnxruntime created the session with {in_use} "
                         "(missing CUDA/cuDNN/TensorRT libraries? see onnxruntime's warnings above). "
                         + unavailable_message(ep, ort.get_available_providers()))
    log.info("%s: session on %s (threads %s)", path.name, ep, threads or "default")
    return session, ep
