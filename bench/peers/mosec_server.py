"""Mosec as its docs advise: its Rust front, a preprocessing (decoding) process per core, one inference process
that batches (8 images, 5 ms) on a model thread per core.

    $ PEER_GRAPH=... PEER_THREADS=2 python mosec_server.py --port 8001
"""

import numpy as np
from mosec import Server, Worker

from common import BATCH, BATCH_WAIT_S, PROCESSES, answer, image_input, session


class Decode(Worker):
    def forward(self, data: dict) -> np.ndarray:
        return image_input(data["image"])


class Infer(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.model = session()

    def forward(self, data: list[np.ndarray]) -> list[dict]:
        probabilities = self.model.run(np.stack(data)).probabilities  # (B, N)
        return [answer(row) for row in probabilities]


if __name__ == "__main__":
    server = Server()
    server.append_worker(Decode, num=PROCESSES, route="/v1/classify")
    server.append_worker(Infer, num=1, max_batch_size=BATCH, max_wait_time=int(BATCH_WAIT_S * 1000),
                         route="/v1/classify")
    server.run()
