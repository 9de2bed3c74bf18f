"""CPU schedule of the TVM build's linears, and the Relax pipeline that applies it.

Every linear of :mod:`omniquant.mlc.tvm_decoder` (packed or float) is TE stages:
``linear_w[k, n]`` (the weight, transposed: for packed weights the dequantization of the codes),
for packed weights ``linear_z[n, g]`` (zero point times scale), and
``linear[.., n] = Σ_k x[.., k] · linear_w[k, n]``. Unscheduled, TVM's ``llvm`` build runs such
loops serially, element by element (minutes per token). :func:`schedule_linears` tiles the output
features by the vector width: each parallel task dequantizes one ``[in, lanes]`` weight tile into
a local buffer (TIR compacts it; no dequantized weight matrix is ever in memory), word by word of
codes, and accumulates every row of ``x`` against it with vector FMAs over the ``lanes`` outputs,
the accumulators held in registers. Not tuned (no MetaSchedule): see the README's speed table.
"""
from __future__ import annotations

import tvm
from tvm import s_tir
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

LINEAR = "linear"  # block name of the matmul stage; its weight stages are f"{LINEAR}_w", f"{LINEAR}_z"


def _schedule(func: tvm.tirx.PrimFunc, lanes: int) -> tvm.tirx.PrimFunc | None:
    sch = s_tir.Schedule(func)
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    pairs = [(name, f"{name}_w") for name in blocks if name.startswith(LINEAR) and f"{name}_w" in blocks]
    done = False
    for name, weight in pairs:
        matmul = blocks[name]
        *rows, n, k = sch.get_loops(matmul)
        n_out = sch.get(n).extent
        if not isinstance(n_out, tvm.tirx.IntImm) or n_out.value % lanes:
            continue  # keep the serial loops (correct, slow) for odd output sizes
        m = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        n_tile, n_lane = sch.split(n, [None, lanes])
        sch.reorder(n_tile, m, k, n_lane)
        store = sch.cache_write(matmul, 0, "local")  # the lanes' accumulators stay in registers over k
        sch.reverse_compute_at(store, m)
        sch.vectorize(sch.get_loops(store)[-1])
        sch.compute_at(blocks[weight], n_tile)
        if f"{name}_z" in blocks:  # packed weights: zero points times scales of the tile's rows
            sch.compute_at(blocks[f"{name}_z"], n_tile)
        k_w, n_w = sch.get_loops(blocks[weight])[-2:]
        sch.split(k_w, [None, 32])  # one word of codes: static shifts
        sch.vectorize(n_w)
        sch.parallel(n_tile)
        sch.vectorize(n_lane)
        init = sch.decompose_reduction(matmul, k)
        sch.vectorize(sch.get_loops(init)[-1])
        done = True
    return sch.mod["main"].with_attr("tirx.is_scheduled", True) if done else None


def schedule_linears(lanes: int) -> tvm.transform.Pass:
    """Schedule every PrimFunc that holds a ``linear`` / ``linear_w`` pair (module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="ScheduleLinears")
    def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                scheduled = _schedule(func, lanes)
                if scheduled is not None:
                    mod[gvar] = scheduled
        return mod

    return apply


def host_target() -> tvm.target.Target:
    """``llvm`` for this machine's CPU (LLVM's host CPU name, hence its vector extensions)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def cpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's default CPU Relax pipeline with :func:`schedule_linears` after operator fusion, one
    float32 vector of the target per output tile."""
    lanes = max(1, tvm.target.codegen.llvm_get_vector_width(target) // 32)

    @tvm.transform.module_pass(opt_level=0, name="OmniquantCPUPipeline")
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
                + [schedule_linears(lanes)] + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target))(mod)

    return pipeline

