"""BentoML as its docs advise: an API service (a worker per core) calling a batchable model service (one worker,
a model thread per core; batches of up to 8).

    $ PEER_GRAPH=... PEER_THREADS=2 bentoml serve bentoml_service:Classify --port 8001
"""

import bentoml
import numpy as np

from common import BATCH, PROCESSES, answer, image_input, session


@bentoml.service(workers=1)
class Model:
    def __init__(self) -> None:
        self.model = session()

    @bentoml.api(batchable=True, max_batch_size=BATCH, max_latency_ms=1000)
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.run(x).probabilities  # (B, 224, 224, 3) -> (B, N)


@bentoml.service(workers=PROCESSES)
class Classify:
    model = bentoml.depends(Model)

    @bentoml.api(route="/v1/classify")
    async def classify(self, image: str) -> dict:
        probabilities = await self.model.to_async.predict(image_input(image)[None])
        return answer(probabilities[0])
