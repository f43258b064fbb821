"""The API's request and response bodies, as they appear in /openapi.json (with examples). A prediction is the
model's (inference.Prediction); /v1/usage's answer is the ledger's (ledger/usage.py)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inference import Prediction, WeightsSource
from settings import MAX_IMAGES

MAX_TOP_K = 20
EncodingFormat = Literal["float", "base64"]

MODEL_VERSION = ("MODEL_VERSION, or 12 hex digits of a SHA-256 of the weights (or ONNX) file, its external data "
                 "and MODEL_LABELS' labels; -int8 after it for int8.")

ONE_PIXEL_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


class ImagesRequest(BaseModel):
    """What /v1/classify and /v1/embeddings both take: the images, and the options of each (the subclasses)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # No min_length: an empty image is the documented 400 `empty_image`, found where the image is decoded.
    image: str | None = Field(None, examples=[ONE_PIXEL_PNG_BASE64],
                              description="The image file's bytes, base64-encoded, or a `data:image/...;base64,` URL. "
                                          "JPEG, PNG, GIF, WEBP, BMP or TIFF; animated images use their first frame.")
    images: list[str] | None = Field(
        None, min_length=1, max_length=MAX_IMAGES, description="Several images, each as `image`; up to MAX_IMAGES_PER_REQUEST, and each "
                                        "counts one request against the rate limit.")

    @model_validator(mode="after")
    def one_of_image_or_images(self) -> "ImagesRequest":
        if (self.image is None) == (self.images is None):
            raise ValueError('send exactly one of "image" (one base64 image) or "images" (a list of them)')
        return self

    @property
    def all_images(self) -> list[str]:
        return [self.image] if self.image is not None else self.images or []

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The fields besides the images (a multipart form's other parts)."""
        return tuple(name for name in cls.model_fields if name not in ("image", "images"))

    def options(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.option_names()}


class ClassifyRequest(ImagesRequest):
    """`image` for one image, or `images` for several (answered in order); exactly one of the two."""

    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="How many labels to return, most likely first.")
    min_confidence: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                  description="Of those `top_k`, only labels at least this confident (0 to 1): an "
                                              "answer may hold fewer, or none.")


class EmbeddingsRequest(ImagesRequest):
    """`image` for one image, or `images` for several (answered in order); exactly one of the two."""

    encoding_format: EncodingFormat = Field("float", description="`float`: each embedding as a list of numbers; "
                                            "`base64`: as the base64 of its little-endian float32 bytes.")


class ImageResult(BaseModel):
    predictions: list[Prediction] = Field(description="Most likely first.")
    inference_ms: float = Field(examples=[9.7], description="Time of the forward pass that answered this image.")
    batch_size: int = Field(examples=[4], description="Images in that forward pass (requests are batched).")


class AnswerHead(BaseModel):
    """What both answers start with, in this order."""

    id: str = Field(examples=["clf_5f2b0c9e8d7a4b1c9e0f3a2d"])
    model: str = Field(examples=["resnet18"], description="The model that answered.")
    model_version: str = Field(examples=["f37072fd47e8"], description=MODEL_VERSION)


# Pydantic puts the last base's fields first: id and model, then the image's result, as in MultiClassification.
class Classification(ImageResult, AnswerHead):
    """The answer to `{"image": ...}`."""


class MultiClassification(AnswerHead):
    """The answer to `{"images": [...]}`: one result per image, in the order sent."""

    results: list[ImageResult]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int = Field(description="The image's place in the request (0 for `image`).")
    embedding: list[float] | str = Field(description="Unit length (L2-normalised): the dot product of two is their "
                                                     "cosine similarity. A string with `encoding_format: base64`.")


class Embeddings(BaseModel):
    """The answer to /v1/embeddings: one vector per image, in the order sent."""

    object: Literal["list"] = "list"
    id: str = Field(examples=["emb_5f2b0c9e8d7a4b1c9e0f3a2d"])
    model: str = Field(examples=["resnet18"])
    model_version: str = Field(examples=["f37072fd47e8"], description=MODEL_VERSION)
    dimensions: int = Field(examples=[512], description="Each embedding's length.")
    data: list[Embedding]


class Preprocessing(BaseModel):
    resize: int = Field(examples=[256], description="The shorter side is scaled to this, ...")
    crop: int = Field(examples=[224], description="... then the centre square of this side is taken.")
    mean: list[float] = Field(examples=[[0.485, 0.456, 0.406]], description="Per channel (RGB), on 0..1 pixels.")
    std: list[float] = Field(examples=[[0.229, 0.224, 0.225]])
    interpolation: Literal["bilinear", "bicubic"]


class ModelInfo(BaseModel):
    id: str = Field(examples=["resnet18"])
    object: Literal["model"] = "model"
    version: str = Field(examples=["f37072fd47e8"], description=MODEL_VERSION)
    labels: int = Field(examples=[1000], description="How many classes it tells apart.")
    label_names: list[str] = Field(examples=[["tench", "goldfish", "great white shark"]],
                                   description="The classes' labels, by class_id.")
    input_size: int = Field(examples=[224], description="Side of the square input, in pixels.")
    preprocessing: Preprocessing
    embedding_dimensions: int | None = Field(examples=[512], description="The length of /v1/embeddings' vectors; "
                                             "null if this model gives none.")
    weights_source: WeightsSource = Field(description="Where the weights came from.")
    fallback_reason: str | None = Field(None, description="Why the server is not running the model it was asked for.")
    backend: Literal["onnxruntime", "torch"] = Field(description="What runs the forward pass.")
    precision: Literal["fp32", "int8"]
    max_batch: int = Field(examples=[8], description="Most images one forward pass takes.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Health(BaseModel):
    status: str = Field(examples=["ok"])
