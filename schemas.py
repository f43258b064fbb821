"""The API's request and response bodies, as they appear in /openapi.json (with examples)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOP_K = 20
MAX_IMAGES = 256  # the most MAX_IMAGES_PER_REQUEST may be; the schema stops at it, before validating every item
WeightsSource = Literal["file", "cache", "download", "fallback package"]
BUCKET_WIDTHS_S = {"1m": 60, "1h": 3600, "1d": 86400}
MAX_UNIX_TIME_S = 32_503_680_000  # year 3000: keeps millisecond times inside a 64-bit integer

ONE_PIXEL_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


class ClassifyRequest(BaseModel):
    """`image` for one image, or `images` for several (answered in order); exactly one of the two."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # No min_length: an empty image is the documented 400 `empty_image`, found where the image is decoded.
    image: str | None = Field(None, examples=[ONE_PIXEL_PNG_BASE64],
                              description="The image file's bytes, base64-encoded, or a `data:image/...;base64,` URL. "
                                          "JPEG, PNG, GIF, WEBP, BMP or TIFF; animated images use their first frame.")
    images: list[str] | None = Field(
        None, min_length=1, max_length=MAX_IMAGES, description="Several images, each as `image`; up to MAX_IMAGES_PER_REQUEST, and each "
                                        "counts one request against the rate limit.")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="How many labels to return, most likely first.")

    @model_validator(mode="after")
    def one_of_image_or_images(self) -> "ClassifyRequest":
        if (self.image is None) == (self.images is None):
            raise ValueError('send exactly one of "image" (one base64 image) or "images" (a list of them)')
        return self

    @property
    def all_images(self) -> list[str]:
        return [self.image] if self.image is not None else self.images or []


class Prediction(BaseModel):
    label: str = Field(examples=["tabby"])
    class_id: int = Field(examples=[281], description="ImageNet class index, 0..999.")
    confidence: float = Field(ge=0, le=1, examples=[0.83])


class ImageResult(BaseModel):
    predictions: list[Prediction] = Field(description="Most likely first.")
    inference_ms: float = Field(examples=[9.7], description="Time of the forward pass that answered this image.")
    batch_size: int = Field(examples=[4], description="Images in that forward pass (requests are batched).")


class AnswerHead(BaseModel):
    """What both answers start with, in this order."""

    id: str = Field(examples=["clf_5f2b0c9e8d7a4b1c9e0f3a2d"])
    model: str = Field(examples=["resnet18"], description="The model that answered.")


# Pydantic puts the last base's fields first: id and model, then the image's result, as in MultiClassification.
class Classification(ImageResult, AnswerHead):
    """The answer to `{"image": ...}`."""


class MultiClassification(AnswerHead):
    """The answer to `{"images": [...]}`: one result per image, in the order sent."""

    results: list[ImageResult]


class UsageBucket(BaseModel):
    start_time: int = Field(description="Unix seconds, inclusive.")
    end_time: int = Field(description="Unix seconds, exclusive.")
    total_requests: int
    successful_requests: int


class Usage(BaseModel):
    object: Literal["usage"] = "usage"
    key_prefix: str = Field(examples=["sk-Qm3xTz8b"])
    total_requests: int = Field(description="This key's /v1/classify requests of every outcome (in the range, if given).")
    successful_requests: int = Field(description="Of those, the ones answered 200.")
    success_rate: float = Field(description="successful / total, in percent; 0 when there were none.")
    avg_response_time_ms: float = Field(description="Mean server time of those requests; 0 when there were none.")
    limit: int = Field(description="Requests admitted per window.")
    window_seconds: int
    remaining: int = Field(description="Requests admissible right now.")
    reset_seconds: int = Field(description="Seconds until the oldest counted request leaves the window.")
    start_time: int | None = None
    end_time: int | None = None
    bucket_width: str | None = None
    buckets: list[UsageBucket] | None = Field(None, description="Per-bucket counts, when bucket_width is given.")


class ModelInfo(BaseModel):
    id: str = Field(examples=["resnet18"])
    object: Literal["model"] = "model"
    labels: int = Field(examples=[1000])
    input_size: int = Field(examples=[224], description="Side of the square input, in pixels.")
    weights_source: WeightsSource
    fallback_reason: str | None = Field(None, description="Why the server is not running the model it was asked for.")
    backend: Literal["onnxruntime", "torch"] = Field(description="What runs the forward pass.")
    precision: Literal["fp32", "int8"]
    max_batch: int = Field(examples=[8], description="Most images one forward pass takes.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Health(BaseModel):
    status: str = Field(examples=["ok"])
