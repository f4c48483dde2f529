# Sourced by speedrun.sh and dev/gpu_check.sh (NUM_GPUS and FREE_BYTES set by the caller).
# The largest power-of-two device batch whose estimated peak memory per GPU fits in 85% of the free memory
# (the rest: allocator fragmentation, NCCL buffers). Usage: pick_batch <module> [flags]
pick_batch() {
    if [ -n "${DEVICE_BATCH:-}" ]; then echo "$DEVICE_BATCH"; return; fi
    local module=$1 b plan
    shift
    for b in 64 32 16 8 4 2 1; do  # a batch that does not divide the global batch fails its dry run: skipped
        plan=$(python -m "$module" "$@" --dry-run --world-size "$NUM_GPUS" --device-batch-size "$b" 2>/dev/null | tail -1) || continue
        if python -c "import json, sys; sys.exit(json.loads(sys.argv[1])['peak_memory_gb_per_gpu'] * 1e9 > 0.85 * $FREE_BYTES)" "$plan"; then
            echo "$b"
            return
        fi
    done
    echo "!!! $module: even a device batch of 1 needs more than the $((FREE_BYTES / 1000000000)) GB free per GPU" >&2
    return 1
}
