"""Shared by tools/bench_encoder_peers.py and tools/bench_cnn_peers.py: the host CPU's model and
feature flags, the timing loop, and exporting a torch module to ONNX and opening it in ONNX
Runtime, so both peers (PyTorch, ONNX Runtime) are timed and recorded the same way.
"""

import math
import os
import platform
import time
import warnings

# The /proc/cpuinfo flags that decide which kernels PyTorch (oneDNN/MKL), ONNX Runtime (MLAS) and
# our CPU backend can use: a ratio between two runs means little unless these match. Keep in
# step with CPU_FLAGS in benches/common/peers.rs, which records the same set on our side.
CPU_FLAGS = [
    # x86
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
    # arm64 (/proc/cpuinfo names them "Features")
    "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16",
]


def cpu_info():
    """{"model": ..., "flags": [the CPU_FLAGS this CPU has, in CPU_FLAGS order]}. Linux reads
    /proc/cpuinfo; elsewhere the model is what `platform` knows and the flags are empty."""
    model, have = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = val.strip()
                elif key in ("flags", "Features") and not have:
                    have = set(val.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(),
            "flags": [f for f in CPU_FLAGS if f in have]}


def percentile(sorted_times, q):
    """The q-quantile's sample, rounding half away from zero like benches/encoder.rs does (Python's
    round() rounds half to even and would pick a different run for an even count)."""
    return sorted_times[min(int(math.floor((len(sorted_times) - 1) * q + 0.5)), len(sorted_times) - 1)]


def time_runs(fn, warmup, min_repeats, min_seconds):
    """Runs fn `warmup` times untimed, then until both min_repeats runs and min_seconds have
    passed (the rule our benches use); returns the run times in seconds, sorted."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times


def export_onnx(module, args, path, input_names, output_names, dynamic_axes):
    """Exports module (called as module(*args)) to path unless path exists (exporting MiniLM or
    ResNet-50 takes seconds to tens of seconds on a small machine). dynamic_axes maps each input
    and output name to {axis: name}. The torch.export-based exporter (PyTorch's default since
    2.9) is tried first; should it fail, the legacy TorchScript one. Written to a temporary file
    and renamed, so an interrupted export never leaves a truncated model to be reused.
    Returns which exporter made the file ("cached" when it was already there)."""
    import torch

    if os.path.exists(path):
        return "cached"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".partial"
    common = dict(input_names=input_names, output_names=output_names)
    try:
        with warnings.catch_warnings():
            # It warns that inputs sharing an axis name share a symbol: intended here.
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(module, args, tmp, dynamo=True, external_data=False,
                              dynamic_shapes=tuple(dynamic_axes[n] for n in input_names),
                              **common)
        how = "dynamo"
    except Exception as e:  # the exporters raise many kinds; any of them means: try the other
        print(f"  torch.export-based ONNX export failed ({type(e).__name__}: {str(e)[:300]}); "
              "trying the TorchScript exporter", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module, args, tmp, dynamo=False, dynamic_axes=dynamic_axes, **common)
        how = "torchscript"
    os.replace(tmp, path)
    print(f"  exported {path} ({how} exporter)", flush=True)
    return how


def ort_session(path, threads):
    """An ONNX Runtime CPU session set up as a deployment would be for latency: every graph
    optimisation (operator fusion, layout changes), `threads` intra-op threads, and no inter-op
    parallelism (the graphs are chains; a second pool would only compete for the cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
