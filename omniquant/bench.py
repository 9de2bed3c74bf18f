"""Speed benchmarks on CPU and CUDA: prefill and decode throughput, memory, bandwidth and the roofline.

A variant is a :class:`Runner`: a prefill (prompt → last logits + KV cache) and a greedy decode step
(token + cache → logits + cache). :func:`benchmark` times it and returns

- ``prefill_tok_s``: tokens/s of one forward over ``1 x prefill_len`` tokens;
- ``decode_tok_s``: ``{"b{batch}_n{tokens}": tokens/s}``, greedy decoding of exactly ``tokens`` new
  tokens per sequence after a ``prompt_len`` prompt (no EOS stop), prefill excluded;
  both are the median of ``repeats`` timed runs (shared CPUs are noisy), the runs in ``decode_runs``;
- ``peak_mem_gb``: peak memory while building and running the variant, above what was in use
  before (``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS on CPU);
- ``weight_bytes`` (all stored tensors), ``bytes_per_step`` (weights read per decode step: all
  but an untied input embedding);
- ``decode_gb_s``: per decode key, the weight bytes the decode streamed per second
  (``tok/s · bytes_per_step / batch``; KV cache and activations not counted);
- ``bandwidth_gb_s``: the median of the copy bandwidths (:func:`memory_bandwidth`) sampled through the run,
  before each variant and once at the end (:class:`Bandwidth`), the samples in ``bandwidth_samples_gb_s``;
- ``roofline_frac``: per decode key, ``decode_gb_s / bandwidth_gb_s``, the share of the weight-streaming bound;
- ``device``: the CPU model or GPU name;
- ``decode_skipped``: ``{"b{batch}_n{tokens}": reason}`` for batches above the runner's ``max_batch``.

Variants (:func:`bench_variants`), the torch ones decoded by :class:`omniquant.decode.Decoder`
(static KV cache, our block forward): ``fp`` (dense model, float32 on CPU, float16 on GPU),
``packed`` (:func:`omniquant.packed.load_packed_model`), ``packed_int8`` (the same with the
8-bit embedding and LM head of the pack stage's second file), ``packed_a8`` (``packed_int8`` with its
decoding rows rounded to int8, :func:`omniquant.packed.use_int8_activations`: the int8 kernels; it
also gets ``isa``, the kernels' path (:func:`omniquant.kernels.cpu.a8_isa`), and ``vs_packed_int8``,
:func:`decode_agreement` against ``packed_int8``), ``packed_hf`` (the packed model through HF's own forward
and cache, to show what the decoder saves), ``torch_int4`` (CPU, 4-bit: the packed model with bfloat16
activations, so :class:`~omniquant.packed.PackedLinear` runs ``aten._weight_int4pack_mm_for_cpu``), ``tvm`` (CPU: :mod:`omniquant.mlc.tvm_decoder`), ``tvm_int8``
(its build of the checkpoint with 8-bit embeddings) and the
llama.cpp variants of :mod:`omniquant.llamacpp` (CPU, batch 1, a GGUF file each). The packed
variants also get ``step_ms``: one batch-1 decode step's milliseconds, and in a hooked (unfused) step those
in the packed linears, the LM head and the rest (:func:`step_profile`).
Random weights are enough (:func:`random_packed_model`): speed does not depend on weight values.
"""
from __future__ import annotations

import functools
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from omniquant import llamacpp, methods
from omniquant.decode import Decoder
from omniquant.errors import UserError
from omniquant.metrics import cpu_model
from omniquant.kernels import cpu as cpu_kernels
from omniquant.packed import INT4_CPU_GROUPS, PackedLinear, bits_per_weight, load_packed_model, use_int8_activations
from omniquant.packing import save_packed
from omniquant.setting import QuantSetting

VARIANTS = ("fp", "packed", "packed_int8", "packed_a8", "packed_hf", "torch_int4", "tvm", "tvm_int8",
            *llamacpp.VARIANTS)
PROFILED = ("packed", "packed_int8", "packed_a8", "packed_hf")  # variants that also get a decode-step profile
GB = 1e9


@dataclass(frozen=True)
class BenchConfig:
    prefill_len: int = 512
    batches: tuple[int, ...] = (1, 8)
    new_tokens: tuple[int, ...] = (128, 512)
    prompt_len: int = 16
    bandwidth_bytes: int = 512 * 2**20  # size of the copy in :func:`memory_bandwidth`
    repeats: int = 3  # timed runs per figure (the median is reported)

    @property
    def context_len(self) -> int:
        """Positions a runner's cache or context must hold: the longest sequence (prefill, or prompt and decode)."""
        return max(self.prefill_len, self.prompt_len + max(self.new_tokens))


@dataclass
class Runner:
    """One variant: ``prefill(ids [b, s]) -> (logits [b, vocab], cache)``, ``step(token [b, 1], cache)`` likewise."""

    prefill: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    step: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
    vocab_size: int
    weight_bytes: int
    bytes_per_step: int
    extra: dict[str, Any] = field(default_factory=dict)  # reported as is (e.g. the TVM build time)
    max_batch: int | None = None  # larger decode batches are skipped with ``max_batch_reason``
    max_batch_reason: str = ""
    parts: dict[str, list[nn.Module]] | None = None  # modules it calls, by part (for :func:`step_profile`)


# ------------------------------------------------------------------------------------------ devices
def device_name(device: torch.device | str, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The GPU's name, or the CPU model from ``cpuinfo``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(cpuinfo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: torch.device | str, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Measured copy bandwidth in bytes/s of ``nbytes`` in fresh buffers (:func:`copy_bandwidth`)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return copy_bandwidth(src, torch.empty_like(src), repeats)


def copy_bandwidth(src: torch.Tensor, dst: torch.Tensor, repeats: int = 5) -> float:
    """Copy bandwidth in bytes/s of ``dst.copy_(src)`` (it reads and writes ``src``'s bytes; best of ``repeats``)."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up (page faults, allocation)
        _sync(src.device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(src.device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


class Bandwidth:
    """The copy bandwidth sampled through one benchmark run (:meth:`sample`: one :func:`copy_bandwidth`).

    A shared VM's bandwidth drifts by half within seconds, so one measurement makes a poor roofline: the
    roofline's denominator is the median of the run's samples (:meth:`apply`). The copy's two buffers of ``nbytes``
    live as long as the sampler: freeing them just before a variant's peak-memory window skews its peak RSS."""

    def __init__(self, device: torch.device | str, nbytes: int = BenchConfig.bandwidth_bytes):
        self.samples: list[float] = []
        self._src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        self._dst = torch.empty_like(self._src)

    def sample(self) -> None:
        self.samples.append(copy_bandwidth(self._src, self._dst))

    def median(self) -> float:
        """The samples' median in bytes/s."""
        if not self.samples:
            raise ValueError("no bandwidth sample was taken")
        return statistics.median(self.samples)

    def report(self) -> dict[str, Any]:
        return {"bandwidth_gb_s": self.median() / GB, "bandwidth_samples_gb_s": [b / GB for b in self.samples]}

    def apply(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` (of :func:`benchmark`) with the run's bandwidth and each decode key's roofline share."""
        median = self.median()
        return result | self.report() | {
            "roofline_frac": {key: gb_s * GB / median for key, gb_s in result["decode_gb_s"].items()}}


class _PeakMemory:
    """Peak memory above the starting level: CUDA allocator peak, or the CPU process's peak RSS (VmHWM)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets the peak RSS (Linux >= 4.0); without it the peak may predate this block
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = _proc_status_kb("VmRSS") * 1024
        return self

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _proc_status_kb("VmHWM") * 1024 - self.base

    def __exit__(self, *exc) -> None:
        return None


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


# ------------------------------------------------------------------------------------------ runners
def _bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of all stored tensors (tied ones once), and of those read per decode step."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    head = {t.data_ptr() for t in model.get_output_embeddings().state_dict().values()}
    embed = [t for t in model.get_input_embeddings().state_dict().values() if t.data_ptr() not in head]
    return total, total - sum(t.numel() * t.element_size() for t in embed)  # an untied embedding: one row a step


def hf_runner(model: nn.Module) -> Runner:
    """A runner for an HF causal LM through its own forward and KV cache (``past_key_values``)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def prefill(ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = model(ids.to(device), use_cache=True, logits_to_keep=1)  # the head at the last position only
        return out.logits[:, -1], out.past_key_values

    @torch.no_grad()
    def step(token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        out = model(token.to(device), past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    weight_bytes, per_step = _bytes(model)
    return Runner(prefill, step, model.config.vocab_size, weight_bytes, per_step, parts=_parts(model))


def _parts(model: nn.Module, linears: list[nn.Module] | None = None) -> dict[str, list[nn.Module]]:
    """The packed linears (``linears``, or the model's) and the LM head, as :func:`step_profile` times them."""
    found = [m for m in model.modules() if isinstance(m, PackedLinear)] if linears is None else linears
    return {"linears": found, "head": [model.get_output_embeddings()]}


def decoder_runner(model: nn.Module, max_len: int) -> Runner:
    """A runner for a causal LM on :class:`omniquant.decode.Decoder` (a static cache of ``max_len`` positions)."""
    decoder = Decoder(model, max_len)

    def prefill(ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        cache = decoder.cache(ids.shape[0])
        return decoder(ids, cache), cache

    def step(token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        return decoder(token, cache), cache

    weight_bytes, per_step = _bytes(model)
    linears = [m for layer in decoder.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)
               if isinstance(m, PackedLinear)]
    return Runner(prefill, step, model.config.vocab_size, weight_bytes, per_step, parts=_parts(model, linears))


def tvm_runner(packed_path: str | Path, out_dir: str | Path) -> Runner:
    """A runner for the TVM build of a packed checkpoint (CPU, float32)."""
    from omniquant.mlc.tvm_decoder import compile_tvm

    model = load_packed_model(packed_path).float()  # the TVM build's parameters are float32 too
    built = compile_tvm(model, out_dir)
    weight_bytes, per_step = _bytes(model)
    vocab = model.config.vocab_size
    del model

    def prefill(ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        logits, cache = built.prefill(ids)
        return logits[:, -1], cache

    def step(token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        logits, cache = built.decode(token, cache)
        return logits[:, -1], cache

    return Runner(prefill, step, vocab, weight_bytes, per_step, {"tvm_build_s": built.build_s})


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the float parameters (not the packed buffers: scales stay float32) to ``dtype``."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def packed_model(packed_path: str | Path, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """The packed model with float parameters (hence activations) in ``dtype``."""
    return _cast_parameters(load_packed_model(packed_path).to(device), dtype)


def int8_activation_model(packed_path: str | Path) -> nn.Module:
    """The packed model on CPU, float32, its decoding rows through the int8-activation kernels."""
    model = load_packed_model(packed_path)
    use_int8_activations(model)
    return model


def torch_int4_model(packed_path: str | Path) -> nn.Module:
    """The packed 4-bit model on CPU with bfloat16 activations: torch's vectorized int4 kernel."""
    model = _cast_parameters(load_packed_model(packed_path), torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not all(m.int4_cpu for m in layers):
        raise UserError(f"torch's int4 CPU kernel needs 4-bit weights in groups of {INT4_CPU_GROUPS} and output "
                        f"sizes that are multiples of 16; this checkpoint is {layers[0].spec.tag}")
    return model


# ------------------------------------------------------------------------------------------ timing
def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _decode(runner: Runner, logits: torch.Tensor, cache: Any, steps: int) -> None:
    """Greedy decoding of ``steps`` tokens (EOS ignored)."""
    for _ in range(steps):
        logits, cache = runner.step(logits.argmax(-1, keepdim=True), cache)


def _decode_tok_s(runner: Runner, prompt: torch.Tensor, tokens: int, device: torch.device) -> float:
    """One timed run: tokens/s of greedy-decoding ``tokens`` after a prefill of ``prompt`` (untimed)."""
    logits, cache = runner.prefill(prompt)
    return prompt.shape[0] * tokens / _timed(lambda: _decode(runner, logits, cache, tokens), device)


def step_profile(runner: Runner, prompt: torch.Tensor, steps: int = 32) -> dict[str, float]:
    """Milliseconds per batch-1 decode step after ``prompt``: ``total`` (timed without hooks), and the
    packed linears and the LM head of a second run timed by forward hooks on ``runner.parts``, with
    ``other`` the rest of that run's step (norms, attention, rotary, Python). The hooks make the
    :class:`omniquant.decode.Decoder` call the modules, so that split is of its unfused step, which
    ``unfused_total`` times (hooks included)."""
    logits, cache = runner.prefill(prompt)
    start = time.perf_counter()
    _decode(runner, logits, cache, steps)
    total = 1e3 * (time.perf_counter() - start) / steps
    spent = {"linears": 0.0, "head": 0.0}
    started: dict[int, float] = {}
    handles = []
    for part, module in ((p, m) for p, modules in runner.parts.items() for m in modules):
        handles.append(module.register_forward_pre_hook(lambda m, _: started.__setitem__(id(m), time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, _i, _o, part=part: spent.__setitem__(part, spent[part] + time.perf_counter() - started[id(m)])))
    try:
        logits, cache = runner.prefill(prompt)
        spent |= dict.fromkeys(spent, 0.0)
        start = time.perf_counter()
        _decode(runner, logits, cache, steps)
        hooked = 1e3 * (time.perf_counter() - start) / steps
    finally:
        for handle in handles:
            handle.remove()
    ms = {part: 1e3 * t / steps for part, t in spent.items()}
    return ms | {"other": hooked - sum(ms.values()), "unfused_total": hooked, "total": total, "steps": steps}


def benchmark(make_runner: Callable[[], Runner], device: torch.device | str = "cpu",
              cfg: BenchConfig = BenchConfig(), bandwidth: Bandwidth | None = None, seed: int = 0,
              profile: bool = False) -> dict[str, Any]:
    """Build a variant with ``make_runner`` and time it (keys: module docstring); ``profile`` adds
    ``step_ms`` (:func:`step_profile`, batch 1) after the timed runs.

    Samples ``bandwidth`` first. Without one, it samples its own before and after, and reports the roofline;
    with one, the caller applies it (:meth:`Bandwidth.apply`) once the run's samples are all in.
    """
    device = torch.device(device)
    own = bandwidth is None
    bandwidth = bandwidth or Bandwidth(device, cfg.bandwidth_bytes)
    bandwidth.sample()
    gen = torch.Generator().manual_seed(seed)
    with _PeakMemory(device) as memory:
        runner = make_runner()
        ids = torch.randint(0, runner.vocab_size, (1, cfg.prefill_len), generator=gen)
        runner.prefill(ids[:, :8])  # warm-up (lazy kernel setup, allocator)
        prefill_s = statistics.median(_timed(lambda: runner.prefill(ids), device) for _ in range(cfg.repeats))
        decode, streamed, skipped, runs = {}, {}, {}, {}
        for batch in cfg.batches:
            if runner.max_batch is not None and batch > runner.max_batch:
                skipped |= {f"b{batch}_n{tokens}": f"batch {batch} > {runner.max_batch}: {runner.max_batch_reason}"
                            for tokens in cfg.new_tokens}
                continue
            prompt = torch.randint(0, runner.vocab_size, (batch, cfg.prompt_len), generator=gen)
            _decode(runner, *runner.prefill(prompt), steps=2)  # warm-up of this batch size
            for tokens in cfg.new_tokens:
                key = f"b{batch}_n{tokens}"
                runs[key] = [_decode_tok_s(runner, prompt, tokens, device) for _ in range(cfg.repeats)]
                decode[key] = statistics.median(runs[key])
                streamed[key] = decode[key] * runner.bytes_per_step / batch / GB
        peak = memory.peak()
        steps = step_profile(runner, torch.randint(0, runner.vocab_size, (1, cfg.prompt_len), generator=gen),
                             min(32, max(cfg.new_tokens))) if profile and runner.parts else None
    result = {
        "prefill_tok_s": cfg.prefill_len / prefill_s,
        "decode_tok_s": decode,
        "decode_runs": runs,
        "decode_gb_s": streamed,
        "peak_mem_gb": peak / GB,
        "weight_bytes": runner.weight_bytes,
        "bytes_per_step": runner.bytes_per_step,
        "device": device_name(device),
        **({"decode_skipped": skipped} if skipped else {}),
        **({"step_ms": steps} if steps else {}),
        **runner.extra,
    }
    if own:
        bandwidth.sample()
        return bandwidth.apply(result)
    return result


def alternated(makers: Mapping[str, Callable[[], Runner]], cfg: BenchConfig = BenchConfig(), seed: int = 0,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """Batch-1 decode tok/s of a few variants (``makers``: name → runner builder) timed in turn, one run of each
    per round (a, b, a, b, ...), so that a machine whose speed drifts over minutes weighs on each alike: each
    variant's runs and their median, and each one's median per-round ratio to the first variant's run."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    tokens = cfg.new_tokens[0]
    runners = {name: make() for name, make in makers.items()}
    prompts = {name: torch.randint(0, r.vocab_size, (1, cfg.prompt_len), generator=gen) for name, r in runners.items()}
    for name, runner in runners.items():
        _decode(runner, *runner.prefill(prompts[name]), steps=2)  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(cfg.repeats):
        for name, runner in runners.items():
            runs[name].append(_decode_tok_s(runner, prompts[name], tokens, device))
    first = runs[next(iter(runs))]
    return {"new_tokens": tokens, "batch": 1, "runs": runs,
            "median_tok_s": {name: statistics.median(r) for name, r in runs.items()},
            "ratio_to_first": {name: statistics.median(a / b for a, b in zip(r, first)) for name, r in runs.items()}}


# ------------------------------------------------------------------------------------------ models
def llama2_7b_config(**overrides: Any) -> LlamaConfig:
    """The shape of Llama-2-7B (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000)."""
    shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    return LlamaConfig(**(shape | overrides))


def random_packed_model(config: PretrainedConfig, setting: QuantSetting, path: str | Path,
                        seed: int = 0, embedding_bits: int | None = None) -> dict[str, Any]:
    """Pack a random-weight model of ``config``'s shape, RTN-quantized at ``setting``, to ``path``
    (``embedding_bits``: as :func:`omniquant.packing.save_packed`).

    Stands in for a calibrated checkpoint of the same shape in speed benchmarks. Returns the path,
    the parameter count and a note saying so.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _, result = methods.quantize(model, setting, "rtn")
    return {
        "path": save_packed(path, model, result.qparams, setting.weight_spec, embedding_bits),
        "parameters": sum(p.numel() for p in model.parameters()),
        "setting": setting.name,
        "note": f"random weights (seed {seed}): speed does not depend on weight values, only on shapes and bits",
    }


def dense_model(packed_path: str | Path) -> nn.Module:
    """The packed checkpoint as a dense HF model: each PackedLinear becomes an ``nn.Linear`` of its
    dequantized weight (the fake-quantized model), in the checkpoint's float dtype."""
    model = load_packed_model(packed_path)
    dtype = model.get_input_embeddings().weight.dtype
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(module.dequantized_weight(dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def bench_variants(packed_path: str | Path, device: torch.device | str = "cpu",
                   variants: tuple[str, ...] = VARIANTS, cfg: BenchConfig = BenchConfig(),
                   ggufs: Mapping[str, Path] | None = None, int8_path: str | Path | None = None,
                   bandwidth: Bandwidth | None = None) -> dict[str, dict]:
    """Benchmark each variant of a packed checkpoint (``fp``: :func:`dense_model`; ``packed_int8``: the
    checkpoint with 8-bit embeddings at ``int8_path``; a llama.cpp variant: its file in ``ggufs``, on
    ``torch.get_num_threads()`` threads); a variant that cannot run here is ``{"skipped": <reason>}``.

    The bandwidth is sampled before each variant and once at the end, and every variant's roofline takes the
    median; with ``bandwidth`` given, the samples go there and the caller applies it."""
    device = torch.device(device)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise UserError(f"unknown benchmark variants {sorted(unknown)}; available: {', '.join(VARIANTS)}")
    ggufs = ggufs or {}
    without = sorted(set(variants) & set(llamacpp.VARIANTS) - set(ggufs))
    if without:
        raise UserError(f"benchmark variants {without} need their GGUF file")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    own = bandwidth is None
    bandwidth = bandwidth or Bandwidth(device, cfg.bandwidth_bytes)
    tvm_dir = tempfile.mkdtemp(prefix="omniquant-tvm-")
    n_ctx = cfg.context_len
    builders: dict[str, Callable[[], Runner]] = {
        "fp": lambda: decoder_runner(dense_model(packed_path).to(device=device, dtype=dtype), n_ctx),
        "packed": lambda: decoder_runner(packed_model(packed_path, device, dtype), n_ctx),
        "packed_int8": lambda: decoder_runner(packed_model(int8_path, device, dtype), n_ctx),
        "packed_a8": lambda: _a8_runner(int8_path, n_ctx),
        "packed_hf": lambda: hf_runner(packed_model(packed_path, device, dtype)),
        "torch_int4": lambda: decoder_runner(torch_int4_model(packed_path), n_ctx),
        "tvm": lambda: tvm_runner(packed_path, tvm_dir),
        "tvm_int8": lambda: tvm_runner(int8_path, tvm_dir),
    } | {name: functools.partial(llamacpp.gguf_runner, path, torch.get_num_threads(), n_ctx)
         for name, path in ggufs.items()}
    no_int8 = None if int8_path else "no checkpoint with 8-bit embeddings was given (the pack stage writes one)"
    no_tvm = "CPU only (TVM build for llvm)" if device.type != "cpu" else _tvm_missing()
    skip = {
        "packed_int8": no_int8,
        "packed_a8": no_int8 or ("CPU only (int8-activation CPU kernels)" if device.type != "cpu"
                                 else cpu_kernels.unavailable()),
        "torch_int4": "CPU only (aten._weight_int4pack_mm_for_cpu)" if device.type != "cpu" else None,
        "tvm": no_tvm,
        "tvm_int8": no_tvm or no_int8,
    } | dict.fromkeys(llamacpp.VARIANTS, "CPU only (llama-cpp-python's CPU build)" if device.type != "cpu"
                      else llamacpp.missing())
    results: dict[str, dict] = {}
    for name in variants:
        if skip.get(name):
            results[name] = {"skipped": skip[name]}
            continue
        try:
            results[name] = benchmark(builders[name], device, cfg, bandwidth, profile=name in PROFILED)
        except UserError as err:
            results[name] = {"skipped": str(err)}
    if own:
        bandwidth.sample()
        results = _applied(bandwidth, results)
    if "skipped" not in results.get("packed_a8", {"skipped": ""}):
        results["packed_a8"]["isa"] = cpu_kernels.a8_isa()
        if "packed_int8" in variants:
            results["packed_a8"]["vs_packed_int8"] = decode_agreement(
                builders["packed_int8"], builders["packed_a8"], cfg.prompt_len, max(cfg.new_tokens))
    return results


def _applied(bandwidth: Bandwidth, results: dict[str, dict]) -> dict[str, dict]:
    """Each timed variant of ``results`` with ``bandwidth`` applied (:meth:`Bandwidth.apply`); skipped ones as they are."""
    return {name: r if "skipped" in r else bandwidth.apply(r) for name, r in results.items()}


def decode_agreement(make_reference: Callable[[], Runner], make_other: Callable[[], Runner], prompt_len: int,
                     steps: int, seed: int = 0) -> dict[str, float]:
    """How far ``other``'s logits stray from ``reference``'s over a batch-1 greedy decode of ``steps`` tokens
    (both fed the reference's tokens): the share of steps with the same top token, and the largest and mean
    absolute logit difference relative to the reference logits' standard deviation."""
    reference, other = make_reference(), make_other()
    ids = torch.randint(0, reference.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    (ref, ref_cache), (got, got_cache) = reference.prefill(ids), other.prefill(ids)
    same, worst, mean = 0, 0.0, 0.0
    for _ in range(steps):
        diff = (got.float() - ref.float()).abs() / ref.float().std()
        same += int(got.argmax() == ref.argmax())
        worst, mean = max(worst, diff.max().item()), mean + diff.mean().item() / steps
        token = ref.argmax(-1, keepdim=True)
        (ref, ref_cache), (got, got_cache) = reference.step(token, ref_cache), other.step(token, got_cache)
    return {"top1_agreement": same / steps, "max_abs_diff_rel": worst, "mean_abs_diff_rel": mean, "steps": steps}


def _tvm_missing() -> str | None:
    try:
        import tvm  # noqa: F401
    except ImportError as err:
        return f"TVM is not importable ({err})"
    return None


def bits_sweep(config: PretrainedConfig, settings: list[QuantSetting], cfg: BenchConfig = BenchConfig(),
               gguf: str | Path | None = None, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Decode speed against bits on one machine, in one run: random-weight packed models of
    ``config``'s shape at each setting (with and without 8-bit embeddings, :func:`random_packed_model`),
    the dense float model once, and llama.cpp on ``gguf`` if given (the same threads); and ``alternated``: every
    setting's ``packed_a8`` (and llama.cpp with ``gguf``) timed in turns (:func:`alternated`), the fair comparison
    of the settings' order on a machine whose speed drifts."""
    out = Path(work_dir or tempfile.mkdtemp(prefix="omniquant-sweep-"))
    bandwidth = Bandwidth("cpu", cfg.bandwidth_bytes)
    results: dict[str, Any] = {"device": device_name("cpu")}
    benched, bits, int8_paths = {}, {}, []
    for i, setting in enumerate(settings):
        made = random_packed_model(config, setting, out / f"{setting.name}.safetensors")
        int8 = random_packed_model(config, setting, out / f"{setting.name}-int8.safetensors", embedding_bits=8)
        int8_paths.append(int8["path"])
        variants = ("packed", "packed_int8", "packed_a8") + (("fp",) if i == 0 else ())
        benched[setting.name] = bench_variants(made["path"], "cpu", variants, cfg, int8_path=int8["path"],
                                               bandwidth=bandwidth)
        bits[setting.name] = bits_per_weight(load_packed_model(made["path"]))
        results |= {"note": made["note"], "parameters": made["parameters"]}
    others = {"fp": benched[settings[0].name].pop("fp")}
    n_ctx = cfg.context_len
    if gguf is not None:
        llama = functools.partial(llamacpp.gguf_runner, gguf, torch.get_num_threads(), n_ctx)
        others["llama_cpp"] = {"gguf": Path(gguf).name} | benchmark(llama, "cpu", cfg, bandwidth)
    bandwidth.sample()
    results |= bandwidth.report() | _applied(bandwidth, others) | {"settings": {
        name: {"bits_per_weight": bits[name]} | _applied(bandwidth, r) for name, r in benched.items()}}
    if "skipped" not in benched[settings[0].name]["packed_a8"]:
        makers = {f"{setting.name} packed_a8": functools.partial(_a8_runner, path, n_ctx)
                  for setting, path in zip(settings, int8_paths)}
        results["alternated"] = alternated(makers | ({"llama_cpp": llama} if gguf is not None else {}), cfg)
    return results


def checkpoints_in_turns(models: Mapping[str, nn.Module], cfg: BenchConfig = BenchConfig()) -> dict[str, Any]:
    """Batch-1 ``packed_a8`` decode of packed models (name → :func:`~omniquant.packed.load_packed_model`; Table 3's
    variant reads the pack stage's checkpoint with 8-bit embeddings) timed in turns (:func:`alternated`, the first
    model the reference): the fair test of their order on one machine, where separate runs minutes apart differ by
    more than the models do. Raises :class:`UserError` where the int8-activation kernels cannot run."""
    for model in models.values():
        use_int8_activations(model)
    makers = {name: functools.partial(decoder_runner, model, cfg.context_len) for name, model in models.items()}
    return {"device": device_name("cpu"), "isa": cpu_kernels.a8_isa()} | alternated(makers, cfg)


def _a8_runner(int8_path: str | Path, n_ctx: int) -> Runner:
    """The ``packed_a8`` variant of a checkpoint with 8-bit embeddings."""
    return decoder_runner(int8_activation_model(int8_path), n_ctx)
