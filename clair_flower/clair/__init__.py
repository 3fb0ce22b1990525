"""CLAIR, the method: recover the shared LoRA subspace and the contaminated clients from a
low-rank plus block-sparse decomposition of the pairwise differences of LoRA updates, and refine
every benign client's update on that subspace.

Flower-free. ``run_clair`` is the entry point; ``docs/DESIGN.md`` describes the reconstruction.
"""

from clair_flower.clair.config import ClairConfig
from clair_flower.clair.inputs import ClairInputError
from clair_flower.clair.result import ClairResult, ClientReport, ModuleReport
from clair_flower.clair.run import run_clair

__all__ = ["ClairConfig", "ClairInputError", "ClairResult", "ClientReport", "ModuleReport", "run_clair"]
