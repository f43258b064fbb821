"""The plain FastAPI server, as a tutorial writes one: a sync route (FastAPI runs it in its thread pool), one
ONNX Runtime call a request, no batching; `uvicorn --workers 2`, one model thread each.

    $ PEER_GRAPH=... PEER_THREADS=1 uvicorn plain_fastapi:app --workers 2 --port 8001
"""

from fastapi import FastAPI
from pydantic import BaseModel

from common import answer, image_input, session

app = FastAPI()
model = session()


class Body(BaseModel):
    image: str


@app.post("/v1/classify")
def classify(body: Body) -> dict:
    x = image_input(body.image)[None]  # (1, 224, 224, 3)
    return answer(model.run(x).probabilities[0])
