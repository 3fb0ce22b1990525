"""clair-flower's Flower-free core.

- :mod:`clair_flower.lora`: LoRA factors (``dW = scaling * B @ A``), shared by every layer.
- :mod:`clair_flower.clair`: the CLAIR method.
- :mod:`clair_flower.copytask`: the copy-task simulation (task, model, training, attacks).

Nothing here imports Flower; ``strategies``, ``client_apps`` and ``server_apps`` build on it.
"""
