"""The LLM demo: fine-tune a real decoder LLM (SmolLM2-135M-Instruct) offline.

``python -m deltalora_jax llm`` (see :mod:`deltalora_jax.demo.cli`). Modules:

* :mod:`deltalora_jax.demo.llm.weights`: the GGUF file, dequantized and cached;
  the tokenizer and chat template from its metadata;
* :mod:`deltalora_jax.demo.llm.model`: a compact NNX Llama with a KV cache;
* :mod:`deltalora_jax.demo.llm.data`: questions about countries, in the chat template;
* :mod:`deltalora_jax.demo.llm.train`: the methods, training, evaluation, export.
"""
