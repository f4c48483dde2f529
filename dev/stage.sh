# Sourced by speedrun.sh / dev/runcpu.sh: `stage "name"` prints a banner and the time of the previous
# stage; `stage_summary` prints all stage times at the end.
STAGE_NAMES=()
STAGE_SECONDS=()
STAGE_START=$(date +%s)
PIPELINE_START=$STAGE_START
stage() {
    local now
    now=$(date +%s)
    if [ ${#STAGE_NAMES[@]} -gt 0 ]; then
        STAGE_SECONDS+=($((now - STAGE_START)))
        echo "-- done in $((now - STAGE_START)) s"
    fi
    STAGE_NAMES+=("$1")
    STAGE_START=$now
    echo
    echo "=== [$(date +%H:%M:%S)] stage ${#STAGE_NAMES[@]}: $1 (elapsed $(( (now - PIPELINE_START) / 60 )) min) ==="
}
stage_summary() {
    local now i
    now=$(date +%s)
    STAGE_SECONDS+=($((now - STAGE_START)))
    echo
    echo "=== stage times ==="
    for i in "${!STAGE_NAMES[@]}"; do
        printf "%6d s  %s\n" "${STAGE_SECONDS[$i]}" "${STAGE_NAMES[$i]}"
    done
    echo "total: $(( (now - PIPELINE_START) / 60 )) min"
}
