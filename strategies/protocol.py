"""Every key of the protocol between this project's server and clients (``docs/DESIGN.md`` section 6).

The strategies, the ClientApp and the ServerApp all import their record names, config
entries and metric names from here, so one edit renames a key everywhere. The record names
and ``num-examples`` are Flower's own defaults (``FedAvg(arrayrecord_key="arrays", ...)``):
strategies take them as constructor arguments, these are only the defaults.
"""

from __future__ import annotations

# -- record names in a message's RecordDict (FlowerTune convention) ----------------------
ARRAYS_KEY = "arrays"
"""ArrayRecord: the PEFT LoRA state dict, both ways."""
METRICS_KEY = "metrics"
"""MetricRecord of a reply."""
CONFIG_KEY = "config"
"""ConfigRecord of an instruction."""
DOWNLINKS = ("own-rank", "merged-delta")
"""What CLAIR sends a client: its refined update at its own rank, or that plus the merged delta."""
MERGED_DELTA_KEY = "merged-delta"
"""Optional ArrayRecord of an instruction (CLAIR's lossless downlink): per module, the part of
the client's refined update that its LoRA rank cannot hold, with the adapter's key names and
orientation at its own rank and no scaling. The client adds ``lora_B @ lora_A`` of each module
to that module's base weight (transposed for GPT-2's ``Conv1D``) before loading its adapter
(:func:`clair_flower.copytask.peft_io.merge_delta`); the adapter keeps its rank."""

# -- ConfigRecord entries the server sends ---------------------------------------------------
SERVER_ROUND = "server-round"
TRAIN_FACTORS = "train-factors"
"""Which LoRA factors the client trains: one of :data:`FACTOR_CHOICES`."""
UPLOAD_FACTORS = "upload-factors"
"""Which LoRA factors the client sends back: one of :data:`FACTOR_CHOICES`."""
ASK = "ask"
"""A QUERY's question; the only one asked is :data:`PARTITION_ID`."""

# Values of TRAIN_FACTORS / UPLOAD_FACTORS.
FACTOR_A = "A"
FACTOR_B = "B"
BOTH_FACTORS = "both"
FACTOR_CHOICES = (BOTH_FACTORS, FACTOR_A, FACTOR_B)

# -- MetricRecord entries a client sends ---------------------------------------------------
# (LORA_ALPHA and USE_RSLORA may also come in a ConfigRecord of the reply.)
NUM_EXAMPLES = "num-examples"
"""Required: the reply's aggregation weight (Flower's ``weighted_by_key`` default)."""
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TRAIN_TOKEN_ACC = "train-token-acc"
"""Optional: token accuracy on the client's train split after its local steps."""
TRAIN_TOKEN_ACC_Q3 = "train-token-acc-q3"
"""Optional: the same after three quarters of the local steps (a plateau test of convergence)."""
PARTITION_ID = "partition-id"
"""Also a node-config key (Flower's simulation injects it), as is :data:`NUM_PARTITIONS`."""
NUM_PARTITIONS = "num-partitions"
LORA_ALPHA = "lora-alpha"
"""Optional: the client's PEFT ``lora_alpha`` (a positive number). A personalised strategy
scales that client's factors with it; without it, the strategy's ``lora_alpha`` applies. The
client's LoRA rank is never reported: it is read from its arrays' shapes, per module."""
USE_RSLORA = "use-rslora"
"""Optional: the client's PEFT ``use_rslora`` (``True``/``False``, or 1/0 in a MetricRecord)."""
CONTAMINATED = "contaminated"
"""Simulation ground truth (also a node-config key in deployment); the ServerApp strips it
from every reply before a strategy sees it."""
