"""fusedkv_megatron: pretraining FusedKV language models on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="fusedkv_megatron",
    version="0.1.0",
    description="FusedKV (arXiv 2512.03870) pretraining on NVIDIA Megatron-Core",
    python_requires=">=3.12",
    packages=find_packages(include=["fusedkv_megatron", "fusedkv_megatron.*"]),
    include_package_data=True,
    package_data={"fusedkv_megatron": ["data/*", "hf/*.py", "evaluation/tasks/*"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19,<0.20",
        "numpy",
        "packaging",
        "psutil",  # needed by megatron.core.dist_checkpointing, not declared upstream
        "pyyaml",
        "sentencepiece>=0.2",
        "tensorboard>=2.16",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "hf": ["transformers>=5.24,<6"],
        "research": ["matplotlib>=3.8"],
        # fusedkv-finetune-hf (HF Trainer + DeepSpeed ZeRO); on CPU it also needs a C++ compiler
        "deepspeed": ["deepspeed==0.19.8", "accelerate>=1.1", "transformers>=5.24,<6"],
        # fusedkv-eval (lm-evaluation-harness; its HF model needs accelerate)
        "eval": ["lm-eval>=0.4.13,<0.5", "accelerate>=1.1", "transformers>=5.24,<6"],
        # fusedkv-pretrain --wandb-project
        "wandb": ["wandb>=0.31,<1"],
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "transformers>=5.24,<6",
            "matplotlib>=3.8",
            "deepspeed==0.19.8",
            "accelerate>=1.1",
            "lm-eval>=0.4.13,<0.5",
            "wandb>=0.31,<1",
        ],
        "dev": ["ruff>=0.6", "pytest>=8", "pytest-timeout", "transformers>=5.24,<6"],
    },
    entry_points={
        "console_scripts": [
            "fusedkv-pretrain=fusedkv_megatron.pretrain:main",
            "fusedkv-convert-hf=fusedkv_megatron.hf.convert:main_to_hf",
            "fusedkv-convert-megatron=fusedkv_megatron.hf.convert:main_to_megatron",
            "fusedkv-finetune-hf=fusedkv_megatron.hf.finetune:main",
            "fusedkv-eval=fusedkv_megatron.evaluation.cli:main",
            "fusedkv-convert-variant=fusedkv_megatron.uptrain:main",
            "fusedkv-plan=fusedkv_megatron.planner.cli:main",
            "fusedkv-compare=fusedkv_megatron.research.compare:main",
            "fusedkv-probe-report=fusedkv_megatron.research.probe:main",
        ]
    },
)
