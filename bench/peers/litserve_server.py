"""LitServe as its docs advise for a CPU: batching (8 images, 5 ms), an inference worker per core (one model thread
each) and an API server process per core.

    $ PEER_GRAPH=... PEER_THREADS=1 python litserve_server.py 8001
"""

import sys

import litserve as ls
import numpy as np

from common import BATCH, BATCH_WAIT_S, PROCESSES, answer, image_input, session


class Classify(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = session()

    def decode_request(self, request: dict) -> np.ndarray:
        return image_input(request["image"])

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)  # (B, 224, 224, 3)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.run(x).probabilities

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict:
        return answer(output)


if __name__ == "__main__":
    api = Classify(max_batch_size=BATCH, batch_timeout=BATCH_WAIT_S, api_path="/v1/classify")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=PROCESSES)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), num_api_servers=PROCESSES, generate_client_file=False)
