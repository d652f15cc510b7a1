"""Tiny reward models of every kind for the serving tests, and `bigrm serve`'s app on a real uvicorn server on
loopback, in a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bigrm.artifacts import export
from bigrm.kinds import Attributes, Steps
from bigrm.model.heads import AttributeHead, record_head
from bigrm.model.reward_model import load_classifier
from tests.helpers.attributes import NAMES
from tests.helpers.runs import free_port

HEAD = AttributeHead(NAMES, (1.0, 0.5, -0.25), (2.0, 1.5, 2.5), (1.5, 0.5, 2.0))


def write_kind(src: Path, dest: Path, kind: str) -> Path:
    """A stepwise (token-classifier) or attributes export of the tiny model at `src`, with a random head."""
    tok = AutoTokenizer.from_pretrained(src)
    outputs = len(HEAD.names) if kind == "attributes" else 1
    classifier = load_classifier(str(src), torch.float32, "sdpa", tok, num_labels=outputs).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        classifier.score.weight.copy_(torch.randn(classifier.score.weight.shape, generator=gen) * 0.3)
    if kind == "attributes":
        record_head(classifier.config, HEAD)
    stats = {"reward_mean": 0.25, "reward_std": 2.0}
    rk = Attributes(HEAD) if kind == "attributes" else Steps("\n")
    export.save_classifier(classifier, classifier.state_dict(), tok, dest, reward_stats=stats, kind=rk)
    export.seal(dest)  # written whole, as bigrm's exports are
    return dest


class Server:
    """create_app(rewarder, ServeOptions(**opts)) served on 127.0.0.1 until close()."""

    def __init__(self, rewarder, **opts) -> None:
        import uvicorn

        from bigrm.inference.serve import ServeOptions, create_app

        port = free_port()
        self.opts = ServeOptions(port=port, **opts)
        self.app = create_app(rewarder, self.opts)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
