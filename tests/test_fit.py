"""The memory estimate and the planner, against described devices (a GPU cannot run here).

The model is a synthetic header shaped like Llama-3-8B: 32 layers, 32 heads, 8 KV heads of 128,
n_embd 4096, n_ff 14336, 128256 tokens. Expected figures are worked out by hand below in MiB:
- KV at 4096 ctx (f16): 8 heads * (128 + 128) * 4096 cells * 2 B = 16 MiB a layer, 512 in all.
- compute, output phase: 512 rows * 128256 * 4 B + 2 * 512 * 4096 * 4 B = 250.5 + 16 = 266.5.
- compute, layer phase: 512 tokens * (3 * 14336 + 5 * 4096) * 4 B = 124, + f16 mask 4096*512*2 = 4.
- fixed: llama.cpp's 12 MiB + 200 B * 128256 tokens + 128 B * 4096 cells = 12 + 24.46 + 0.5 = 36.96,
  and localrun's own 16 MiB + 64 B * 128256 tokens = 23.83; the logits of one row: 0.49.
Plans are for generation, whose contexts reserve one logits row (runtime sets n_outputs_max = 1):
their output phase is 0.49 + 16 = 16.5 MiB, so the layer phase (128 MiB) is the compute buffer.
"""

from __future__ import annotations

import pytest

from localrun.fit import GPU_RESERVE, MemoryEstimate, Option, Plan, choose, default_ctx, estimate, plan
from localrun.hardware import GPU, Machine
from localrun.inference.machine import this_machine
from localrun.inference.safety import selftest
from localrun.model.header import HeaderInfo, read_header

MiB = 2**20
GiB = 2**30
KV_LAYER = 16 * MiB
OUTPUT_PHASE = int(266.5 * MiB)
LAYER_PHASE = 128 * MiB
FIXED = 12 * MiB + 200 * 128256 + 128 * 4096 + 16 * MiB + 64 * 128256 + 4 * 128256


def llama8b(layer_mib: float, embd_mib: float, output_mib: float, quant: str, **extra) -> HeaderInfo:
    layer = int(layer_mib * MiB)
    fields = dict(
        architecture="llama",
        name="Llama 3 8B",
        file_type=quant,
        n_params=8_030_000_000,
        n_layer=32,
        n_embd=4096,
        n_head=32,
        n_head_kv=[8] * 32,
        key_length=128,
        value_length=128,
        n_ctx_train=8192,
        sliding_window=None,
        swa_layers=[False] * 32,
        n_expert=0,
        n_expert_used=0,
        n_vocab=128256,
        layer_bytes=[layer] * 32,
        embd_bytes=int(embd_mib * MiB),
        output_bytes=int(output_mib * MiB),
        other_bytes=0,
        tensor_bytes=32 * layer + int((embd_mib + output_mib) * MiB),
        file_size=0,
        n_shards=1,
        chat_template=None,
        license=None,
        n_ff=14336,
    )
    fields.update(extra)
    return HeaderInfo(**fields)


Q4_K_M = llama8b(125, 280, 410, "Q4_K_M")  # 4690 MiB of tensors, ~4.9 GB like the real file
Q8_0 = llama8b(212, 532, 532, "Q8_0")  # 7848 MiB, ~8.2 GB


def gpu_box(vram_free_gib: float, ram_gib: float = 16, n: int = 1) -> Machine:
    gpus = [GPU(f"GPU {i}", int((vram_free_gib + 0.5) * GiB), int(vram_free_gib * GiB)) for i in range(n)]
    return Machine(int(ram_gib * GiB), int((ram_gib - 2) * GiB), gpus)


def cpu_box(ram_gib: float, available_gib: float) -> Machine:
    return Machine(int(ram_gib * GiB), int(available_gib * GiB), [])


def apple(ram_gib: float, available_gib: float) -> Machine:
    share = int(ram_gib * GiB * 2 / 3)  # Metal's default working-set limit (hardware.py)
    return Machine(int(ram_gib * GiB), int(available_gib * GiB), [GPU("Apple GPU", share, share, unified=True)])


def test_default_context():
    assert default_ctx(Q4_K_M) == 4096
    assert default_ctx(llama8b(1, 1, 1, "Q4_K_M", n_ctx_train=2048)) == 2048  # capped by training
    assert default_ctx(Q4_K_M, 16384) == 16384  # an explicit --ctx wins


def test_cpu_only_estimate_by_hand():
    est = estimate(Q4_K_M, 4096, 0)
    assert est.vram == 0
    assert est.weights_ram == (32 * 125 + 280 + 410) * MiB
    assert est.kv_ram == 32 * KV_LAYER
    assert est.compute_ram == OUTPUT_PHASE  # logits of a whole micro-batch outweigh the layer phase
    assert est.ram == (4690 + 512) * MiB + OUTPUT_PHASE + FIXED


def test_full_offload_puts_the_output_layer_on_the_gpu():
    est = estimate(Q4_K_M, 4096, 33)
    assert est.weights_vram == (32 * 125 + 410) * MiB
    assert est.weights_ram == 280 * MiB  # token_embd stays on the CPU
    assert (est.kv_vram, est.kv_ram) == (512 * MiB, 0)
    assert est.compute_vram == OUTPUT_PHASE
    assert est.compute_ram == 2 * 512 * 4096 * 4  # host-side inputs only
    # 32 = every block but not the output layer: its logits are computed on the CPU
    est32 = estimate(Q4_K_M, 4096, 32)
    assert est32.weights_ram == (280 + 410) * MiB and est32.compute_vram == LAYER_PHASE
    assert est32.compute_ram == OUTPUT_PHASE


def test_partial_offload_takes_the_last_blocks_first():
    header = llama8b(100, 280, 410, "Q4_K_M", layer_bytes=[i * MiB for i in range(1, 33)])
    est = estimate(header, 4096, 3)
    assert est.weights_vram == (30 + 31 + 32) * MiB
    assert est.kv_vram == 3 * KV_LAYER and est.kv_ram == 29 * KV_LAYER


def test_tied_output_is_copied_to_the_gpu():
    tied = llama8b(125, 280, 0, "Q4_K_M", output_tied=True)
    assert estimate(tied, 4096, 33).weights_vram == (32 * 125 + 280) * MiB
    assert estimate(tied, 4096, 33).weights_ram == 280 * MiB
    assert estimate(tied, 4096, 0).weights_ram == (32 * 125 + 280) * MiB  # one copy on the CPU


def test_kv_cache_type_and_sliding_window():
    assert estimate(Q4_K_M, 4096, 0, "q8_0").kv_ram == 32 * 8 * 256 * 4096 * 34 // 32
    assert estimate(Q4_K_M, 1000, 0).kv_ram == 32 * 8 * 256 * 1024 * 2  # cells padded to 256
    swa = llama8b(125, 280, 410, "Q4_K_M", sliding_window=1024, swa_layers=[i % 4 != 3 for i in range(32)])
    # localrun keeps llama.cpp's full-size SWA cache: the same as without a window
    assert estimate(swa, 8192, 0).kv_ram == 32 * 32 * MiB
    # without it, 24 windowed layers hold 1024 + 512 cells instead of 8192
    assert estimate(swa, 8192, 0, swa_full=False).kv_ram == 8 * 32 * MiB + 24 * 8 * 256 * 1536 * 2


def test_repacked_weights_on_the_cpu():
    header = llama8b(125, 280, 410, "Q4_K_M", matmul_bytes={"Q4_K": 3000 * MiB, "Q6_K": 1000 * MiB})
    plain = estimate(header, 4096, 0).weights_ram
    assert estimate(header, 4096, 0, cpu_features=["avx2"]).weights_ram == plain + 3000 * MiB
    assert estimate(header, 4096, 0, cpu_features=["avx2"], extra_bufts=False).weights_ram == plain
    # only the CPU half of the blocks is repacked when 16 are offloaded
    half = estimate(header, 4096, 16, cpu_features=["avx2"])
    assert half.weights_ram == (16 * 125 + 280 + 410 + 1500) * MiB


def test_8gib_gpu_runs_q4_fully_and_q8_partly():
    res = gpu_box(7.5)  # VRAM budget: 7.5 GiB - 0.5 reserve = 7168 MiB
    q4 = plan(Q4_K_M, res)
    assert (q4.placement, q4.n_gpu_layers, q4.n_ctx, q4.fits, q4.note) == ("gpu", 33, 4096, True, None)
    assert q4.estimate.vram == (4000 + 410 + 512) * MiB + LAYER_PHASE  # 5050 MiB
    # Q8_0: every block costs 212 + 16 (KV) MiB, plus the 128 MiB layer-phase compute buffer:
    # 30 blocks = 6968 MiB fit in 7168, 31 = 7196 do not
    q8 = plan(Q8_0, res)
    assert (q8.placement, q8.n_gpu_layers, q8.fits) == ("partial", 30, True)
    assert q8.note == "30/33 layers on GPU"
    assert q8.estimate.vram == 30 * (212 * MiB + KV_LAYER) + LAYER_PHASE


def test_24gib_gpu_runs_q8_fully():
    q8 = plan(Q8_0, gpu_box(23.5, ram_gib=32))
    assert (q8.placement, q8.n_gpu_layers) == ("gpu", 33)
    assert q8.estimate.vram == (32 * 212 + 532 + 512) * MiB + LAYER_PHASE  # 7956 MiB


def test_two_gpus_add_up_but_each_needs_a_compute_buffer():
    one = plan(Q8_0, gpu_box(5.5, ram_gib=32))
    assert one.placement == "partial"
    two = plan(Q8_0, gpu_box(5.5, ram_gib=32, n=2))  # 2 x 5120 MiB: 7956 + 128 fit
    assert (two.placement, two.n_gpu_layers) == ("gpu", 33)


def test_cpu_only():
    res = cpu_box(8, available_gib=7)  # room: 7 GiB - 1 GiB headroom = 6144 MiB
    q4 = plan(Q4_K_M, res)
    assert (q4.placement, q4.n_gpu_layers, q4.n_ctx, q4.fits, q4.note) == ("cpu", 0, 4096, True, None)
    assert q4.estimate.ram == (4690 + 512) * MiB + LAYER_PHASE + FIXED  # ~5367 MiB
    q8 = plan(Q8_0, res)  # 7848 MiB of weights alone
    assert (q8.placement, q8.fits, q8.n_ctx) == ("none", False, 4096)
    assert q8.note == "needs more memory than this machine has"


def test_a_smaller_context_when_the_requested_one_does_not_fit():
    res = cpu_box(8, available_gib=6.5)  # room: 5632 MiB
    # 16384 ctx needs 2048 MiB of KV (~6915 MiB in all), 8192 ctx 1024 (~5883): too much; 4096: ~5367
    got = plan(Q4_K_M, res, n_ctx=16384)
    assert (got.placement, got.n_ctx, got.fits) == ("cpu", 4096, True)
    assert got.note == "context reduced to 4096 to fit"


def test_apple_unified_memory_is_one_pool():
    roomy = plan(Q8_0, apple(16, available_gib=12))  # GPU limit 10.67 GiB - 0.5; pool 12 - 1.6 GiB
    assert (roomy.placement, roomy.n_gpu_layers) == ("gpu", 33)
    # 8 GiB available: Q8_0 needs ~8.5 GiB in all, whichever side it is on
    tight = apple(16, available_gib=8)
    assert plan(Q8_0, tight).placement == "none"
    assert plan(Q4_K_M, tight).placement == "gpu"
    # the same 8 GiB of RAM next to a discrete GPU of the same size runs Q8_0 on the GPU
    discrete = Machine(16 * GiB, 8 * GiB, [GPU("GPU", int(10.67 * GiB), int(10.67 * GiB))])
    assert plan(Q8_0, discrete).placement == "gpu"


def test_vram_reserve_is_kept_free():
    need = estimate(Q4_K_M, 4096, 33, logits_rows=1).vram
    just_enough = Machine(32 * GiB, 30 * GiB, [GPU("GPU", need + GPU_RESERVE, need + GPU_RESERVE)])
    assert plan(Q4_K_M, just_enough).placement == "gpu"
    short = Machine(32 * GiB, 30 * GiB, [GPU("GPU", need + GPU_RESERVE - 1, need + GPU_RESERVE - 1)])
    assert plan(Q4_K_M, short).placement == "partial"


def _options(res: Machine) -> list[Option]:
    q6 = llama8b(165, 410, 410, "Q6_K")
    return [
        Option(name, quality, header.tensor_bytes, plan(header, res))
        for name, quality, header in (("Q8_0", 90.0, Q8_0), ("Q6_K", 85.0, q6), ("Q4_K_M", 70.0, Q4_K_M))
    ]


def test_choose_follows_the_memory():
    assert [o.key for o in _options(gpu_box(23.5))][choose(_options(gpu_box(23.5)))] == "Q8_0"
    # 8 GiB GPU: Q6_K needs 32*165 + 410 + 512 + 128 = 6330 MiB: the best that runs fully on it
    options = _options(gpu_box(7.5))
    assert [o.plan.placement for o in options] == ["partial", "gpu", "gpu"]
    assert options[choose(options)].key == "Q6_K"
    options = _options(gpu_box(5.0))  # Q4_K_M (5050) fits 4608 MiB? no: nothing is fully on the GPU
    assert all(o.plan.placement == "partial" for o in options)
    assert options[choose(options)].key == "Q8_0"  # then the best quality that fits at all
    options = _options(cpu_box(8, available_gib=7))
    assert options[choose(options)].key == "Q4_K_M"
    assert choose(_options(cpu_box(4, available_gib=3))) is None


def test_choose_prefers_the_smaller_of_equal_quality():
    est = MemoryEstimate(0, 0, 0, 0, 0, 0, 0)
    fits = Plan("cpu", 0, 4096, est, True)
    assert choose([Option("a", 70, 2000, fits), Option("b", 70, 1000, fits)]) == 1
    assert choose([]) is None


def test_plan_for_the_real_gemma_on_this_machine(gemma):
    header = read_header(gemma)
    res = this_machine()
    got = plan(header, res)
    assert got.fits and got.n_ctx == 4096  # the default, below the 32k it was trained with
    assert got.placement == ("gpu" if res.gpus else "cpu")
    assert header.tensor_bytes < got.estimate.ram + got.estimate.vram < 2 * GiB


def test_moe_activations_count_the_chosen_experts():
    dense = llama8b(125, 280, 410, "Q4_K_M")
    moe = llama8b(125, 280, 410, "Q4_K_M", n_expert=128, n_expert_used=8, n_ff=0, n_ff_expert=768)
    # per token: 3 * (8 * 768 + 128) + 5 * 4096 floats, against 3 * 14336 + 5 * 4096 for the dense model
    moe_layer = estimate(moe, 4096, 32).compute_vram
    assert moe_layer == 512 * 4 * (3 * (8 * 768 + 128) + 5 * 4096) + 4 * MiB
    assert moe_layer < estimate(dense, 4096, 32).compute_vram == LAYER_PHASE


@pytest.mark.parametrize("quant, n_ctx", [("Q8_0", 1024), ("Q4_K_M", 2048)])
def test_estimate_covers_what_llama_cpp_allocates(tiny, quant, n_ctx):
    """Real llama.cpp on a tiny model: the buffers it logs against the estimate, part by part."""
    from localrun.hardware import cpu_info
    from localrun.inference.llama import log as llama_log
    from localrun.inference.llama.runtime import LoadOptions, load

    extra = selftest.use_extra_bufts()
    llama_log.install()
    llama_log.clear()
    loaded = load(tiny.quants[quant], LoadOptions(n_ctx=n_ctx, n_batch=512, use_extra_bufts=extra))
    try:
        logged = {kind: sum(sizes.values()) for kind, sizes in llama_log.buffer_sizes(llama_log.recent(400)).items()}
    finally:
        loaded.close()
    est = estimate(
        read_header(tiny.quants[quant]), n_ctx, 0, extra_bufts=extra, cpu_features=cpu_info().features, logits_rows=1
    )  # a generation context, as runtime creates it
    assert est.kv_ram == logged["KV"] == 2 * 2 * 128 * n_ctx * 2
    assert logged["model"] <= est.weights_ram <= logged["model"] + 128 * 1024  # logged to 0.01 MiB
    assert logged["compute"] <= est.compute_ram <= logged["compute"] + 2 * MiB
    assert logged["output"] <= est.output_ram


def test_a_context_beyond_the_trained_one_is_planned_with_a_warning():
    got = plan(Q4_K_M, cpu_box(64, available_gib=60), n_ctx=16384)  # trained with 8192
    assert got.fits and got.n_ctx == 16384
    assert got.note == "context 16384 is beyond the 8192 the model was trained with: expect worse output past that"


def test_a_plans_notes_are_data_a_caller_picks_by_kind():
    """The server says the context notes per slot: it finds them by kind, with their figures."""
    beyond = plan(Q4_K_M, cpu_box(64, available_gib=60), n_ctx=16384)  # trained with 8192
    assert [(n.kind, n.figures) for n in beyond.notes] == [("beyond_trained", (16384, 8192))]
    assert beyond.note == beyond.notes[0].text
    q8 = plan(Q8_0, gpu_box(7.5))
    assert [(n.kind, n.figures) for n in q8.notes] == [("gpu_partial", (30, 33))]


def test_the_largest_context_that_fits_is_the_edge_of_the_plan():
    """max_ctx: the plan fits there with the same placement, and one KV pad more does not (or
    it is the trained context); q8_0 KV cache reaches further than f16."""
    from localrun.fit import CELL_PAD, Shape

    for machine in (cpu_box(16, 7.0), cpu_box(16, 6.8), gpu_box(5.0, ram_gib=32)):
        f16 = plan(Q4_K_M, machine)
        q8 = plan(Q4_K_M, machine, shape=Shape("q8_0", "q8_0", True))
        assert f16.fits and f16.max_ctx >= f16.n_ctx
        if not machine.gpus:  # the same placement: a smaller KV cache reaches further
            assert q8.max_ctx > f16.max_ctx
        for shape, reach in ((Shape(), f16), (Shape("q8_0", "q8_0", True), q8)):
            at = plan(Q4_K_M, machine, reach.max_ctx, shape)
            assert at.fits and at.n_ctx == reach.max_ctx and at.n_gpu_layers == reach.n_gpu_layers
            if reach.max_ctx < Q4_K_M.n_ctx_train:
                beyond = plan(Q4_K_M, machine, reach.max_ctx + CELL_PAD, shape)
                assert beyond.n_ctx < reach.max_ctx + CELL_PAD or beyond.n_gpu_layers < reach.n_gpu_layers
    # a context asked beyond the trained one that fits is never above its own reach
    past = plan(Q4_K_M, cpu_box(64, 60), Q4_K_M.n_ctx_train * 2)
    assert past.fits and past.max_ctx >= past.n_ctx


# -- split across workers (--rpc) ------------------------------------------------------------------
def with_workers(machine: Machine, *free_gib: float, total_gib: float = 8) -> Machine:
    from localrun.workers import Worker, WorkerDevice

    found = [
        Worker(f"10.0.0.{i + 2}:50052", "7.0.0", (WorkerDevice(0, int(f * GiB), int(total_gib * GiB)),))
        for i, f in enumerate(free_gib)
    ]
    return machine.with_workers(tuple(found))


def test_a_split_shares_the_layers_in_proportion_to_the_memory_free():
    # a layer is 125 MiB of weights + 16 of KV = 141 MiB. Here: 8 GiB available - 1.6 GiB headroom
    # - what stays here whatever the split (embeddings 280, output 410, compute 128, fixed ~61) =
    # ~5674 MiB; each worker: 4 GiB - 256 MiB reserve - 128 MiB compute = 3712. 32 layers in
    # proportion: 13.9, 9.1, 9.1 -> 14, 9, 9 (the largest remainder rounds up).
    p = plan(Q4_K_M, with_workers(cpu_box(16, 8), 4, 4))
    assert p.placement == "split" and p.fits and p.n_ctx == 4096
    assert [(s.where, s.layers) for s in p.split] == [("here", 14), ("10.0.0.2:50052", 9), ("10.0.0.3:50052", 9)]
    assert p.note == "plan: 14 layers here, 9 on 10.0.0.2:50052, 9 on 10.0.0.3:50052"
    # llama.cpp offloads the last 18 blocks and the output layer; the output counted on the last
    # device (the loader keeps its weights here: runtime), tensor_split in the workers' order
    assert p.n_gpu_layers == 19 and p.tensor_split == (9, 10) and p.rpc == ("10.0.0.2:50052", "10.0.0.3:50052")
    assert p.split[1].memory == 9 * (125 + 16) * MiB + LAYER_PHASE


def test_a_worker_lending_a_cpu_keeps_the_headroom_of_ram():
    # ggml says a CPU has all its RAM free: 8 GiB "free" of 8 keeps 1 GiB, not 256 MiB
    cpu_worker = plan(Q4_K_M, with_workers(cpu_box(16, 8), 8, total_gib=8))
    gpu_worker = plan(Q4_K_M, with_workers(cpu_box(16, 8), 7.99, total_gib=8))
    assert cpu_worker.split[1].layers < gpu_worker.split[1].layers


def test_a_model_that_fits_no_combination_says_so():
    p = plan(Q8_0, with_workers(cpu_box(8, 4), 1, 1))
    assert p.placement == "none" and not p.fits
    assert p.note == "needs more memory than this machine and its workers have together"
    assert p.split == () and p.tensor_split == () and p.rpc == ()
