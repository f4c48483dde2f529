# Sourced by speedrun.sh and dev/runcpu.sh: a .venv that reuses packages already on the machine,
# torch if it is missing (CUDA build with an NVIDIA driver, else the CPU build), and nanochat itself.
if [ ! -d .venv ]; then
    python3 -m venv --system-site-packages .venv
fi
source .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        pip install torch
    elif curl -sfI --max-time 5 https://download.pytorch.org/whl/cpu/ >/dev/null 2>&1; then
        pip install torch --index-url https://download.pytorch.org/whl/cpu   # CPU build: ~200 MB, not ~3 GB
    else
        pip install "torch==2.13.0"
    fi
fi
pip install -q -e .
