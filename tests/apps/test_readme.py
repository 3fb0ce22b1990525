"""The README's code runs as written: every ```python block preceded by ``<!-- runnable ... -->``.

Each marked block is executed in a fresh namespace. A block that defines a Flower ``ServerApp``
named ``app`` is then run the way Flower runs it, ``app(grid, context)``, on an in-process grid
(no Ray) of FlowerTune-style ClientApps built on the block's own ``peft_model()``: so the
library-usage example is checked end to end, not only for syntax.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs

README = Path(__file__).resolve().parents[2] / "README.md"
RUNNABLE = re.compile(r"^<!-- runnable\b[^\n]*-->\n```python\n(.*?)^```", re.S | re.M)
NUM_NODES, CONTAMINATED = 5, {3}


def runnable_blocks(text: str) -> list[str]:
    """The Python code of every block marked runnable, in README order."""
    return [m.group(1) for m in RUNNABLE.finditer(text)]


def test_the_marker_finds_exactly_the_marked_blocks() -> None:
    text = ("```python\nskipped = 1\n```\n<!-- runnable -->\n```python\na = 1\n```\n"
            "<!-- runnable: with a note -->\n```python\nb = 2\n```\n<!-- runnable -->\n```bash\nls\n```\n")
    assert runnable_blocks(text) == ["a = 1\n", "b = 2\n"]


def _flowertune_client(peft_model) -> ClientApp:  # noqa: ANN001 - the README's model factory
    """A ClientApp written as FlowerTune's are, on the README's model: set the received adapter,
    train a few steps on copy sequences (partition 3 on random targets), upload the PEFT state."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = peft_model()
        set_peft_model_state_dict(model, {k: torch.from_numpy(v.numpy()) for k, v in msg.content["arrays"].items()})
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        pid = int(context.node_config["partition-id"])
        vocab = model.config.vocab_size
        for step in range(3):
            rng = np.random.default_rng([pid, int(msg.content["config"]["server-round"]), step])
            x = rng.integers(0, vocab, size=(16, 6))
            y = rng.integers(0, vocab, size=x.shape) if pid in CONTAMINATED else x
            ids = torch.from_numpy(np.concatenate([x, y], axis=1))
            labels = ids.clone()
            labels[:, :6] = -100
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        arrays = ArrayRecord({k: v.detach() for k, v in get_peft_model_state_dict(model).items()})
        metrics = MetricRecord({"num-examples": 16, "partition-id": pid})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 16})}), reply_to=msg)

    return app


def test_readme_has_runnable_blocks() -> None:
    assert runnable_blocks(README.read_text()), "README.md has no block marked <!-- runnable -->"


@pytest.mark.parametrize("index", range(len(runnable_blocks(README.read_text()))))
def test_runnable_readme_block_runs_as_written(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    code = runnable_blocks(README.read_text())[index]
    namespace: dict[str, object] = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md runnable block {index}", "exec"), namespace)  # noqa: S102 - the point
    app = namespace.get("app")
    if not isinstance(app, ServerApp):
        return
    assert callable(namespace.get("peft_model")), "a runnable ServerApp block defines peft_model()"
    client = _flowertune_client(namespace["peft_model"])
    grid = InProcessGrid(client, simulation_node_configs(NUM_NODES), {})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with caplog.at_level(logging.INFO, logger="flwr"):
        app(grid, context)
    lines = [r.getMessage() for r in caplog.records]
    rounds = [line for line in lines if re.match(r"CLAIR round \d+: decided by ", line)]
    assert len(rounds) == 3, lines
    # Clients are named by the partition ids they report, never by Flower node ids.
    assert all("flagged partitions [" in line or "flagged none" in line for line in rounds), rounds
    assert all(re.search(r"server \d+\.\d\d s", line) for line in rounds), rounds
