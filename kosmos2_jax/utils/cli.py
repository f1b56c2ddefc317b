"""What every command line shares: argument types that check ranges and paths, a parser whose
errors are one line (exit code 2) and whose `--help` shows the defaults, and `run`, which turns
the project's user errors into one line instead of a traceback.

A user error is a `UsageError` (`utils/errors.py`, what the library raises on bad input) or a
missing or misplaced file (`FileNotFoundError`, ...); anything else, a plain `ValueError` from
JAX included, is a bug and keeps its traceback. `KOSMOS2_DEBUG=1` shows
the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
from typing import Callable

from kosmos2_jax.utils.errors import UsageError

_REAL_STDERR = None  # a copy of the real stderr once `fd2_silenced` left fd 2 silenced


USER_ERRORS = (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)


def shows_default(action: argparse.Action) -> bool:
    """Whether `--help` states this option's default: every option that has one (not None, empty,
    a False switch or --help itself)."""
    default = action.default
    return (bool(action.option_strings) and default is not None and default is not False
            and default is not argparse.SUPPRESS and not (isinstance(default, (str, list, tuple)) and not default))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in `--help`, once (an option whose help already says "(default: ...)"
    keeps its own wording); the module docstring's usage lines kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if shows_default(action) and "(default" not in text:
            text = f"{text} (default: %(default)s)".lstrip()
        return text

    def _format_action(self, action):
        if not action.help and shows_default(action):  # argparse prints no help line at all then
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`PROG: error: argument --x: ...`, exit code 2) and defaults in `--help`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def stderr():
    """Where one-line errors go: stderr, or its copy when `fd2_silenced` left fd 2 silenced."""
    return _REAL_STDERR or sys.stderr


@contextlib.contextmanager
def fd2_silenced():
    """Silence file descriptor 2 for the block. When the block raises, it stays silenced until the
    process ends and `stderr()` writes to the real one: a failed Orbax restore leaves reads in
    other threads that keep printing event-loop tracebacks, which would bury the one-line error."""
    global _REAL_STDERR
    sys.stderr.flush()
    real, quiet = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    os.close(quiet)
    try:
        yield
    except BaseException:
        if _REAL_STDERR is None:
            _REAL_STDERR = os.fdopen(real, "w", buffering=1)
        else:
            os.close(real)
        raise
    os.dup2(real, 2)
    os.close(real)


def error(message: str) -> int:
    print(f"error: {message}", file=stderr())
    return 2


def skip_absent_tpu() -> None:
    """With libtpu installed (the test extras) on a machine without a TPU, JAX would probe for one
    and libtpu would print its errors ("could not determine TPU worker hostnames", a source
    location trace): drop JAX's TPU backend there, before any backend starts. A TPU VM (its chips
    on the PCI bus), JAX_PLATFORMS or JAX_FORCE_TPU_INIT keep JAX's own behaviour."""
    import importlib.util

    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    try:
        import dataclasses

        from jax._src import hardware_utils, xla_bridge

        tpu = xla_bridge._backend_factories.get("tpu")
        if tpu and hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0 and not xla_bridge._backends:
            # still registered (JAX's modules register TPU lowerings), never started
            xla_bridge._backend_factories["tpu"] = dataclasses.replace(tpu, factory=_no_tpu, fail_quietly=True)
    except (ImportError, AttributeError, TypeError):  # another JAX: its probe messages, nothing worse
        pass


def _no_tpu():
    raise RuntimeError("no TPU on this machine")


def _terminated(signum, frame):
    print("terminated (SIGTERM)", file=sys.stderr, flush=True)
    raise SystemExit(143)


def run(main: Callable[[], int | None]) -> int:
    """Call `main()`; a user error becomes one line on stderr and exit code 2; Ctrl-C and SIGTERM
    unwind (unfinished outputs are removed) and exit 130 / 143."""
    import signal
    import threading

    skip_absent_tpu()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return main() or 0
    except USER_ERRORS as e:
        if os.environ.get("KOSMOS2_DEBUG"):
            raise
        return error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        if os.environ.get("KOSMOS2_DEBUG"):
            raise
        print("interrupted (Ctrl-C): finished outputs are kept, unfinished ones discarded; "
              "the same command resumes where it can", file=sys.stderr, flush=True)
        return 130


def _range_text(lo, hi) -> str:
    if hi is None:
        return f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"in [{lo}, {hi}]"


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be an integer {_range_text(lo, hi)}")
        return value
    parse.__name__ = "integer"
    return parse


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [lo, hi] ((lo, hi] with `lo_open`)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        low = lo is not None and (value <= lo if lo_open else value < lo)
        if not math.isfinite(value) or low or (hi is not None and value > hi):
            where = (f"in ({lo}, {hi}]" if hi is not None else f"> {lo}") if lo_open else _range_text(lo, hi)
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be a number {where}")
        return value
    parse.__name__ = "number"
    return parse


def _existing(kind: str) -> Callable[[str], str]:
    """An argparse type: an existing path; `kind` "file" or "folder" also checks which it is."""
    def parse(text: str) -> str:
        if not os.path.exists(text):
            raise argparse.ArgumentTypeError(f"{text!r} does not exist")
        if kind and os.path.isdir(text) != (kind == "folder"):
            other = "file" if kind == "folder" else "folder"
            raise argparse.ArgumentTypeError(f"{text!r} is a {other}, not a {kind}")
        return text
    parse.__name__ = f"existing_{kind or 'path'}"
    return parse


existing_file = _existing("file")
existing_dir = _existing("folder")
existing_path = _existing("")


def output_file(text: str) -> str:
    """An argparse type: a file to write (not an existing folder; its parent is created on write).
    "" stays "" (an optional output left unset)."""
    if not text:
        return text
    if text.endswith(os.sep) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: give a file name")
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r}: {parent!r} is a file, not a folder")
    return text


# --- the persistent XLA compilation cache ------------------------------------------------------
CACHE_ENV = "KOSMOS2_COMPILATION_CACHE"


def default_compilation_cache() -> str:
    """$KOSMOS2_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/kosmos2_jax/xla
    (under $XDG_CACHE_HOME when set)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return (os.environ.get(CACHE_ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
            or os.path.join(cache_home, "kosmos2_jax", "xla"))


def add_compilation_cache_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compilation_cache", default=default_compilation_cache(), type=output_dir,
                        help="persistent XLA compilation cache: a later run of the same shapes loads its programs "
                             "instead of compiling them (env KOSMOS2_COMPILATION_CACHE)")
    parser.add_argument("--no_compilation_cache", action="store_true", help="compile afresh and write no cache")


DECODE_MODES = ("auto", "fused", "layerwise")  # inference/generate.py's


def add_decode_mode_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode_mode", default="auto", choices=DECODE_MODES,
                        help="fused: a decoding step in one program, --tokens_per_call steps per dispatch (GPUs, "
                             "TPUs); layerwise: a program per layer driven from Python (fastest on a CPU); auto: "
                             "layerwise on a CPU, fused elsewhere")
    parser.add_argument("--tokens_per_call", type=integer(1), default=32,
                        help="--decode_mode fused: decoding steps one dispatch runs at most")


def add_mesh_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", default="",
                        help="decode sharded over this process's devices, as AXIS=SIZE items over the training "
                             "mesh's axes (data, fsdp, tensor; -1 = the rest), e.g. tensor=4: heads, MLP and "
                             "vocabulary split over 4 chips (the fused decoding mode); empty: one device")


def use_compilation_cache(folder: str | None, compile_only: bool = False) -> None:
    """Keep the XLA executables a command compiles in `folder` (None or "": off). Every program is
    kept, not only those over JAX's default of one second (a generation bucket compiles in less).
    No size limit: JAX's eviction races between processes sharing the folder; delete it to clear.
    `compile_only` (a described TPU slice's programs): off, as this machine's client cannot load
    them back (a rerun warned on every entry)."""
    import jax

    if not folder or compile_only:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def apply_compilation_cache_flags(args: argparse.Namespace) -> None:
    use_compilation_cache(None if args.no_compilation_cache else args.compilation_cache,
                          compile_only=getattr(args, "compile_only", False))


def output_dir(text: str) -> str:
    """An argparse type: a folder to write (not an existing file); "" stays "" (unset)."""
    if text and os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file: give a folder")
    return text


# --- XLA flags for GPU training -----------------------------------------------------------------
# What MaxText's GPU scripts and NVIDIA's JAX-Toolbox set for LLM training on an 8-GPU H100 host:
# the latency-hiding scheduler with pipelined FSDP collectives (overlap communication with compute),
# collectives combined up to 1 GiB (all-reduce) and 1 GiB / 8 GPUs (all-gather; half that for
# reduce-scatter), loop double buffering, and no CUDA command buffers.
GPU_XLA_PRESETS = {
    "training": {
        "xla_gpu_enable_latency_hiding_scheduler": "true",
        "xla_gpu_enable_highest_priority_async_stream": "true",
        "xla_gpu_all_reduce_combine_threshold_bytes": str(2 ** 30),
        "xla_gpu_all_gather_combine_threshold_bytes": str(2 ** 30 // 8),
        "xla_gpu_reduce_scatter_combine_threshold_bytes": str(2 ** 30 // 16),
        "xla_gpu_enable_pipelined_all_gather": "true",
        "xla_gpu_enable_pipelined_reduce_scatter": "true",
        "xla_gpu_enable_pipelined_all_reduce": "true",
        "xla_gpu_enable_while_loop_double_buffering": "true",
        "xla_gpu_enable_command_buffer": "",
    },
    "none": {},
}


# libtpu flags for a job over several slices, as MaxText sets them (benchmarks/xla_flags_library.py:
# DATA_PARALLEL_OVERLAP for the data-parallel all-reduce across the data-center network, and the
# async collective fusion set its multi-slice recipes export in LIBTPU_INIT_ARGS): overlap the
# cross-slice gradient all-reduce and the in-slice gathers with compute.
TPU_XLA_PRESETS = {
    "multislice": {
        "xla_tpu_enable_data_parallel_all_reduce_opt": "true",
        "xla_tpu_data_parallel_opt_different_sized_ops": "true",
        "xla_tpu_enable_async_collective_fusion": "true",
        "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
        "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
        "xla_tpu_overlap_compute_collective_tc": "true",
        "xla_enable_async_all_gather": "true",
    },
    "none": {},
}


def use_tpu_xla_flags(preset: str) -> list[str]:
    """Add `TPU_XLA_PRESETS[preset]` to LIBTPU_INIT_ARGS before libtpu starts (a flag already there
    is left as the user set it); libtpu reads them on a TPU and in a compile-only check alike.
    Returns the flags added."""
    if preset not in TPU_XLA_PRESETS:
        raise UsageError(f"--xla_tpu_preset {preset!r}: must be one of auto, {', '.join(TPU_XLA_PRESETS)}")
    current = os.environ.get("LIBTPU_INIT_ARGS", "")
    added = [f"--{name}={value}" for name, value in TPU_XLA_PRESETS[preset].items() if f"--{name}=" not in current]
    if added:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join([current] + added).strip()
    return added


def tpu_machine() -> bool:
    """Will JAX run on TPUs here? JAX_PLATFORMS when set, else a TPU VM's accelerator devices."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return any(p.strip() == "tpu" for p in platforms.split(","))
    return os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio") and bool(os.listdir("/dev/vfio"))


def gpu_machine() -> bool:
    """Will JAX run on NVIDIA GPUs here? Decided before JAX starts: JAX_PLATFORMS when set, else a
    CUDA plugin installed and an NVIDIA device present."""
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return any(p.strip() in ("cuda", "gpu") for p in platforms.split(","))
    plugin = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    return plugin and os.path.exists("/dev/nvidiactl")


def use_gpu_xla_flags(preset: str, on_gpu: bool | None = None) -> list[str]:
    """On a GPU machine, add `GPU_XLA_PRESETS[preset]` to XLA_FLAGS before JAX starts its backend
    (a flag already in XLA_FLAGS is left as the user set it). Returns the flags added."""
    if preset not in GPU_XLA_PRESETS:
        raise UsageError(f"--xla_gpu_preset {preset!r}: must be one of {', '.join(GPU_XLA_PRESETS)}")
    if not (gpu_machine() if on_gpu is None else on_gpu):
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in GPU_XLA_PRESETS[preset].items() if f"--{name}=" not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current] + added).strip()
    return added
