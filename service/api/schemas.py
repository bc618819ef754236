"""Wire models: what clients send and get back. Every field is described for /docs."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Bounds a client controls. The settings may lower max texts and text length further.
MAX_TEXTS = 32
MAX_TEXT_CHARS = 256
MAX_GALLERY_BATCH = 64

Text = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT_CHARS)
]
ModelRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._@-]+$",
        description="a model name, name@version, or a backbone alias: vilbert or lxmert",
    ),
]
ImageB64 = Annotated[
    str, Field(min_length=1, description="the image file (PNG, JPEG, GIF, WEBP, BMP), base64")
]
ImageId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VqaParams(Strict):
    """The fields of a VQA request besides the image (multipart sends them as form fields)."""

    questions: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)
    model: ModelRef | None = None
    top_k: int = Field(3, ge=1, le=10, description="answers returned per question")


class VqaRequest(VqaParams):
    image: ImageB64


class MatchParams(Strict):
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)
    model: ModelRef | None = None


class MatchRequest(MatchParams):
    image: ImageB64


class GroundRequest(Strict):
    image: ImageB64
    expressions: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)
    model: ModelRef | None = None


class Attributes(BaseModel):
    color: str | None = None
    size: str | None = None


class Region(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in the image's pixels")
    label: str
    score: float
    attributes: Attributes


class ScoredAnswer(BaseModel):
    answer: str
    score: float = Field(description="sigmoid of the answer's logit, in [0, 1]")


class QuestionAnswers(BaseModel):
    question: str
    answers: list[ScoredAnswer] = Field(description="best first")


class VqaResponse(BaseModel):
    model: str = Field(description="the model that answered, as name@version")
    regions: list[Region]
    answers: list[QuestionAnswers]


class TextScore(BaseModel):
    text: str
    score: float = Field(
        description="probability that the text describes the image; above 0.5 is a match "
        "(calibrated on validation pairs when the model lists a match_calibration; with "
        "its by_sentence, a text of several sentences also has each sentence checked alone "
        "and gets the lowest score; with its claims, a shapes-world caption also has each "
        "claim it makes asked of the VQA head, and scores no higher than its least sure one)"
    )


class MatchResponse(BaseModel):
    model: str
    scores: list[TextScore]


class Grounding(BaseModel):
    expression: str
    box: list[float]
    score: float = Field(description="softmax over the regions of the chosen region's logit")
    region_index: int


class GroundResponse(BaseModel):
    model: str
    results: list[Grounding]


class GalleryCreate(Strict):
    model: ModelRef | None = None


class GalleryImage(Strict):
    id: ImageId | None = Field(None, description="defaults to the image's sha256 prefix")
    image: ImageB64


class GalleryAdd(Strict):
    images: list[GalleryImage] = Field(min_length=1, max_length=MAX_GALLERY_BATCH)


class GalleryAdded(BaseModel):
    ids: list[str]


class GalleryInfo(BaseModel):
    name: str
    model: str
    count: int


class SearchRequest(Strict):
    caption: Text
    k: int = Field(10, ge=1, le=100)
    rerank: int = Field(50, ge=0, le=500, description="first-stage hits rescored; 0 = none")


class SearchHit(BaseModel):
    id: str
    score: float


class SearchResponse(BaseModel):
    model: str
    results: list[SearchHit]


class ModelInfo(BaseModel):
    name: str
    version: str
    backbone: str
    tasks: list[str]
    detector: str | None
    metrics: dict
    match_calibration: dict | None = Field(
        None,
        description="how /v1/match combines the alignment head's logit with the embeddings' "
        "cosine, whether it checks each sentence of a text alone (by_sentence) and each "
        "claim of a caption with the VQA head (claims: the threshold on the least claim "
        "margin; null: not asked); fitted by `vqa train calibrate`; null: the head's logit "
        "alone",
    )


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
