#!/usr/bin/env bash
# One device call for the performance issue: GPU tests ($TESTS to name other files), then the benchmarks named in $PARTS
# (default: gen mole train; ffn: the MoE FFN table; sonic: the FFN table with SonicMoE on the same weights (shapes $SONIC_SHAPES, default 1 2 3); sonictiles: QuACK's autotuning of SonicMoE's GEMMs against vlmoe's tile candidates (default shape 3); probe: the layer with the code paths in $PROBES switched (moe_layer.py --probe; default dgated more dgated+more) against the shipped one, paired (shapes $PROBE_SHAPES, default 3 1 2); clocks: step time against the GPU's SM clock and power, from idle and sustained (clocks.py; shapes $CLOCKS_SHAPES, default 3, probes $CLOCKS_PROBES, CLOCKS_COMPILED=1 adds the compiled layer); ffnrep: its headline ratios at 50 reps;
# ffnvar: the FFN table with v14's memory savings switched off one by one; gemm: the expert
# matmuls alone; rowtiles: the varlen-M GEMMs over tiles of coarse and fine row blocks (quack_fused_ops.py --tiles rows; shapes $ROWTILES_SHAPES, default 3); gathers: the backward's token rows copied first against read in the GEMMs' loads (quack_fused_ops.py --gathers; shapes $GATHERS_SHAPES, default 3); tgemm: the Triton grouped-GEMM probe; quack: the QuACK GEMM probe; fusedops: each
# QuACK call of the fused SwiGLU experts against the unfused ones; first: QuACK's first-use cost, cold and cached; firstpar: cold with the candidates compiled on QuACK's workers and one after another (v26), then cached; trainq: the
# train step with QuACK's GEMMs and with grouped_mm; moves: the row gathers, combine and routing; decodediag: the batch-1 decoding diagnosis; decodeblocks: the decode kernels' block sizes; compile: graph breaks and gain; ffn3: shape 3 of the FFN table alone, paired rounds; gaps3: where the GPU idles in a shape-3 step; profprobe: the kernels of a step of the layer and of it under each of $PROBES (shapes $PROFPROBE_SHAPES, default 3)),
# each under its own time limit so one slow part cannot eat the rest.
#   PARTS="gen mole train" bash benchmarks/device_perf.sh
#   PARTS="static gen1" bash benchmarks/device_perf.sh   # compiled decoding, eager batch 1
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
out=${OUT:-/tmp}
parts=${PARTS-gen mole train}  # PARTS="" runs the tests alone (unset: the defaults)
# QuACK (optional, vlmoe[quack]) from wheels carried in .whl (see benchmarks/README.md: the device
# has no package index); its CUTLASS-DSL libraries travel as an xz archive to fit the carry limit.
# The target must sit under a site-packages directory: QuACK fingerprints epilogue functions for
# its compile cache, and treats functions from anywhere else as its own (then fails on the
# CUTLASS DSL's module state: "no fail-closed semantic key").
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vlmoe-deps/site-packages .whl/*.whl
    for archive in .whl/*.tar.xz; do [ -f "$archive" ] && tar -xJf "$archive" -C /tmp/vlmoe-deps/site-packages; done
    export PYTHONPATH=src:/tmp/vlmoe-deps/site-packages:/tmp/vlmoe-deps/site-packages/nvidia_cutlass_dsl/dsl_packages
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
python3 -c "from vlmoe.moe.kernels import quack_gemm; print('QuACK expert GEMMs:', quack_gemm.available())"
tests=${TESTS:-tests/moe/test_kernels.py tests/moe/test_decode.py tests/moe/test_graphs.py tests/moe/test_routing_kernel.py tests/moe/test_dispatch_gpu.py tests/moe/test_quack_gemm_gpu.py tests/train/test_trainer.py}
# TESTS_K: a pytest -k expression, passed whole (one inside TESTS would be split at its spaces)
timeout ${TESTS_S:-150} python3 -m pytest -p no:cacheprovider -q $tests ${TESTS_K:+-k "$TESTS_K"} --continue-on-collection-errors > "$out/gpu_tests.log" 2>&1
tail -3 "$out/gpu_tests.log"
for part in $parts; do
    case $part in
        gen) timeout 70 python3 benchmarks/generation.py --new 64 > "$out/generation.log" 2>&1 ;;
        gen1) timeout ${GEN1_S:-150} python3 benchmarks/generation.py --new 64 --batches 1 --reps ${GEN1_REPS:-7} --models ${GEN1_MODELS:-vlmoe,eager-ffn,dense,mixtral} > "$out/generation_b1.log" 2>&1 ;;
        gen32) timeout ${GEN32_S:-150} python3 benchmarks/generation.py --new 64 --batches 32 --reps ${GEN32_REPS:-5} --models ${GEN32_MODELS:-vlmoe,eager-ffn,mixtral} > "$out/generation_b32.log" 2>&1 ;;
        decodeblocks) timeout ${DECODEBLOCKS_S:-240} python3 benchmarks/decode_blocks.py > "$out/decode_blocks.log" 2>&1 ;;
        decodelayer) timeout ${DECODELAYER_S:-90} python3 benchmarks/decode_layer.py > "$out/decode_layer.log" 2>&1 ;;
        static) timeout ${STATIC_S:-75} python3 benchmarks/generation.py --new 64 --batches 1 --static --models vlmoe,mixtral > "$out/generation_static.log" 2>&1 ;;
        ffn) timeout 170 python3 benchmarks/moe_layer.py > "$out/moe_ffn.log" 2>&1 ;;
        sonic) timeout ${SONIC_S:-420} python3 benchmarks/moe_layer.py --ffn-only --headline --sonic --telemetry --reps ${SONIC_REPS:-30} --rounds ${SONIC_ROUNDS:-5} $(for n in ${SONIC_SHAPES:-1 2 3}; do echo --shape $n; done) > "$out/moe_ffn_sonic.log" 2>&1 ;;
        sonictiles) QUACK_PRINT_AUTOTUNING=1 timeout ${SONIC_S:-300} python3 benchmarks/moe_layer.py --ffn-only --headline --sonic --reps 5 --rounds 0 $(for n in ${SONIC_SHAPES:-3}; do echo --shape $n; done) > "$out/sonic_autotune.log" 2>&1
            python3 benchmarks/quack_autotune_log.py "$out/sonic_autotune.log" ;;
        probe) timeout ${PROBE_S:-420} python3 benchmarks/moe_layer.py --ffn-only --headline --telemetry $(for p in ${PROBES:-dgated more dgated+more}; do echo --probe $p; done) --reps ${PROBE_REPS:-30} --rounds ${PROBE_ROUNDS:-7} $(for n in ${PROBE_SHAPES:-3 1 2}; do echo --shape $n; done) > "$out/moe_ffn_probes.log" 2>&1 ;;
        clocks) for shape in ${CLOCKS_SHAPES:-3}; do
                timeout ${CLOCKS_S:-200} python3 benchmarks/clocks.py --shape $shape --seconds ${CLOCKS_SECONDS:-2} --blocks ${CLOCKS_BLOCKS:-4} ${CLOCKS_COMPILED:+--compiled-layer} $(for p in ${CLOCKS_PROBES:-}; do echo --probe $p; done) > "$out/clocks_shape$shape.log" 2>&1
                grep -v "Warning\|warn" "$out/clocks_shape$shape.log" | tail -${CLOCKS_TAIL:-30}
            done ;;
        ffnq) timeout ${FFNQ_S:-200} python3 benchmarks/moe_layer.py --ffn-only --reps 30 > "$out/moe_ffn_quack.log" 2>&1 ;;
        ffnvar) timeout 170 python3 benchmarks/moe_layer.py --ffn-only --variants --reps 40 > "$out/moe_ffn_variants.log" 2>&1 ;;
        compile) timeout 90 python3 benchmarks/compile_check.py > "$out/compile.log" 2>&1; cat "$out/compile.log" ;;
        ffn3) timeout ${FFN3_S:-150} python3 benchmarks/moe_layer.py --ffn-only --shape 3 --reps 30 --rounds ${FFN3_ROUNDS:-7} --v18-pairs > "$out/moe_ffn_shape3.log" 2>&1 ;;
        gaps3) timeout 60 python3 benchmarks/gaps.py 16384 2048 1408 64 6 > "$out/gaps_shape3.log" 2>&1; cat "$out/gaps_shape3.log" ;;
        ffnrep) timeout 140 python3 benchmarks/moe_layer.py --ffn-only --reps 50 > "$out/moe_ffn_rep.log" 2>&1 ;;
        mole) timeout ${MOLE_S:-40} python3 benchmarks/moe_layer.py --mole-only > "$out/moe_layer.log" 2>&1 ;;
        train) timeout ${TRAIN_S:-70} python3 benchmarks/train_step.py --optimizers foreach fused > "$out/train_step.log" 2>&1 ;;
        trainv14) timeout 90 python3 benchmarks/train_step.py --optimizers fused --without-v14 > "$out/train_step_v14.log" 2>&1 ;;
        tgemm) timeout 300 python3 benchmarks/triton_grouped_gemm.py > "$out/triton_grouped_gemm.log" 2>&1 ;;
        epivar) timeout ${EPIVAR_S:-300} python3 benchmarks/quack_fused_ops.py --epilogues $(for n in ${EPIVAR_SHAPES:-1 2 3}; do echo --shape $n; done) > "$out/quack_epilogue_variants.log" 2>&1; grep -v "^  \|Warning\|warn" "$out/quack_epilogue_variants.log" ;;
        fusedops) timeout ${FUSEDOPS_S:-300} python3 benchmarks/quack_fused_ops.py > "$out/quack_fused_ops.log" 2>&1 ;;
        quack) timeout 400 python3 benchmarks/quack_gemm.py --reps 10 --tune-seconds 120 > "$out/quack_gemm.log" 2>&1 ;;
        first) caches="QUACK_CACHE_DIR=$(mktemp -d) VLMOE_CACHE_DIR=$(mktemp -d)"
            for run in cold cached; do echo "-- $run"; env $caches timeout 150 python3 benchmarks/quack_first_use.py; done > "$out/quack_first_use.log" 2>&1
            cat "$out/quack_first_use.log" ;;
        firstpar) # v26: cold first use with the candidates compiled on QuACK's workers and one after another, every cache
            # (QuACK's, vlmoe's, Triton's) empty for each run, in the order of $FIRST_ORDER; then one run with the caches
            # (a mode: 0, 1, or 1 followed by quack_first_use.py's arguments joined with ":", e.g. 1:--pool:shared)
            for mode in ${FIRST_ORDER:-1 0 1 0}; do
                caches="QUACK_CACHE_DIR=$(mktemp -d) VLMOE_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d)"
                echo "-- cold, VLMOE_QUACK_PARALLEL_COMPILE=$mode"
                env $caches VLMOE_QUACK_PARALLEL_COMPILE=${mode%%:*} timeout 150 python3 benchmarks/quack_first_use.py --shapes ${FIRST_SHAPES:-3} $(echo "${mode#?}" | tr ':' ' ')
            done > "$out/quack_first_use.log" 2>&1
            echo "-- cached (the last run's caches)" >> "$out/quack_first_use.log"
            env $caches timeout 100 python3 benchmarks/quack_first_use.py --shapes ${FIRST_SHAPES:-3} >> "$out/quack_first_use.log" 2>&1
            grep -v "^    " "$out/quack_first_use.log" ;;
        trainq) timeout 120 python3 benchmarks/train_step.py --optimizers fused --without-quack > "$out/train_step_quack.log" 2>&1 ;;
        gemm) timeout 60 python3 benchmarks/gemm_efficiency.py > "$out/gemm_efficiency.log" 2>&1 ;;
        decodediag) timeout ${DECODEDIAG_S:-120} python3 benchmarks/decode_diagnosis.py --models ${DECODEDIAG_MODELS:-dense,vlmoe,mixtral} > "$out/decode_diagnosis.log" 2>&1 ;;
        prof1) timeout 60 python3 benchmarks/profile_moe.py 16384 2048 5632 4 2 > "$out/profile_shape1.log" 2>&1 ;;
        prof2) timeout 60 python3 benchmarks/profile_moe.py 8192 4096 14336 8 2 > "$out/profile_shape2.log" 2>&1 ;;
        prof3) timeout 60 python3 benchmarks/profile_moe.py 16384 2048 1408 64 6 > "$out/profile_shape3.log" 2>&1 ;;
        profprobe) for shape in ${PROFPROBE_SHAPES:-3}; do
                dims=$(case $shape in 1) echo 16384 2048 5632 4 2;; 2) echo 8192 4096 14336 8 2;; 3) echo 16384 2048 1408 64 6;; esac)
                timeout ${PROFPROBE_S:-150} python3 benchmarks/profile_moe.py $dims $(for p in ${PROBES:-dgated+more more}; do echo --probe $p; done) > "$out/profile_probes_shape$shape.log" 2>&1
                grep "^===\|host .* per step" "$out/profile_probes_shape$shape.log"
            done ;;
        pairs) timeout 90 python3 benchmarks/quack_fused_ops.py --pairs > "$out/swiglu_pairs.log" 2>&1; cat "$out/swiglu_pairs.log" ;;
        chosen) timeout ${CHOSEN_S:-200} python3 benchmarks/quack_fused_ops.py --chosen > "$out/quack_chosen.log" 2>&1; grep -v "^  \|Warning\|warn" "$out/quack_chosen.log" | tail -22 ;;
        tiles) timeout ${TILES_S:-420} python3 benchmarks/quack_fused_ops.py --tiles > "$out/quack_tiles.log" 2>&1 ;;
        gathers) timeout ${GATHERS_S:-200} python3 benchmarks/quack_fused_ops.py --gathers $(for n in ${GATHERS_SHAPES:-3}; do echo --shape $n; done) > "$out/quack_gathers.log" 2>&1
            grep -v "^  \|Warning\|warn" "$out/quack_gathers.log" | tail -12 ;;
        rowtiles) timeout ${ROWTILES_S:-300} python3 benchmarks/quack_fused_ops.py --tiles rows $(for n in ${ROWTILES_SHAPES:-3}; do echo --shape $n; done) > "$out/quack_row_tiles.log" 2>&1
            grep -v "^  \|Warning\|warn" "$out/quack_row_tiles.log" | tail -30 ;;
        trainseg) timeout 90 python3 benchmarks/train_step.py --optimizers fused --segments > "$out/train_step.log" 2>&1 ;;
        autotune) timeout ${AUTOTUNE_S:-420} python3 benchmarks/moe_layer.py --ffn-only --autotune > "$out/moe_ffn_autotune.log" 2>&1 ;;
        moves) timeout 60 python3 benchmarks/row_moves.py > "$out/row_moves.log" 2>&1; cat "$out/row_moves.log" ;;
        sync) timeout 30 python3 benchmarks/sync_check.py > "$out/sync_check.log" 2>&1; cat "$out/sync_check.log" ;;
        profmole) timeout ${PROFMOLE_S:-45} python3 benchmarks/profile_moe.py mole > "$out/profile_mole.log" 2>&1 ;;
    esac
    echo "== $part: exit $?"
done
for log in "$out"/profile_shape*.log; do
    [ -f "$log" ] && { echo "== $log"; grep "^===\|host .* per step" "$log"; }
done
for log in "$out"/quack_tiles.log "$out"/quack_fused_ops.log "$out"/quack_gemm.log "$out"/triton_grouped_gemm.log "$out"/gemm_efficiency.log "$out"/decode_diagnosis.log "$out"/decode_layer.log "$out"/decode_blocks.log "$out"/generation*.log "$out"/moe_layer.log "$out"/moe_ffn*.log "$out"/train_step*.log; do
    [ -f "$log" ] && { echo "== $log"; grep -v "^  \|Warning\|warn" "$log" | tail -25; }
done
# At most 8 files come back from a device call: the JSON tables travel as one archive.
(cd "$out" && ls ./*.json >/dev/null 2>&1 && tar czf results_json.tgz ./*.json && rm -f ./*.json)
