"""The copy-task simulation: a synthetic text-copying task, a small Transformer built from a
``transformers`` config and adapted with ``peft`` LoRA, local training, and the contamination
(data and model attacks) that a poisoned client applies. Flower-free.
"""
