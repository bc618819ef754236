"""Image galleries searched by caption: create, add, delete, inspect, search."""

from typing import Annotated

from fastapi import APIRouter, Path, Response

from service.api.deps import ApiKey, EngineDep, decode_base64_image
from service.api.schemas import (
    GalleryAdd,
    GalleryAdded,
    GalleryCreate,
    GalleryInfo,
    SearchRequest,
    SearchResponse,
)

GalleryName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
ImageId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]

router = APIRouter(prefix="/v1/galleries", tags=["galleries"])


@router.put("/{name}", response_model=GalleryInfo, status_code=201, dependencies=[ApiKey])
async def create_gallery(name: GalleryName, engine: EngineDep, body: GalleryCreate | None = None):
    """Create an empty gallery bound to one model (409 if the name is taken)."""
    return await engine.galleries.create(name, body.model if body else None)


@router.get("/{name}", response_model=GalleryInfo)
async def gallery_info(name: GalleryName, engine: EngineDep):
    """The gallery's model and image count."""
    return await engine.galleries.info(name)


@router.delete("/{name}", status_code=204, dependencies=[ApiKey])
async def delete_gallery(name: GalleryName, engine: EngineDep) -> Response:
    """Delete the gallery and everything stored for it."""
    await engine.galleries.delete(name)
    return Response(status_code=204)


@router.post("/{name}/images", response_model=GalleryAdded, dependencies=[ApiKey])
async def add_images(name: GalleryName, body: GalleryAdd, engine: EngineDep):
    """Add images: regions and embeddings are computed once and stored, all or none."""
    images = [
        (item.id, decode_base64_image(item.image, f"images[{i}].image"))
        for i, item in enumerate(body.images)
    ]
    return {"ids": await engine.galleries.add(name, images)}


@router.delete("/{name}/images/{image_id}", status_code=204, dependencies=[ApiKey])
async def delete_image(name: GalleryName, image_id: ImageId, engine: EngineDep) -> Response:
    """Remove one image from the gallery."""
    await engine.galleries.delete_image(name, image_id)
    return Response(status_code=204)


@router.post("/{name}/search", response_model=SearchResponse)
async def search(name: GalleryName, body: SearchRequest, engine: EngineDep):
    """Vector search over the dual embeddings, then the top `rerank` rescored by the
    cross-attention alignment head. `model` is the version the gallery is bound to; a model
    reload moves the gallery to the new version (re-indexed from its stored regions)."""
    return await engine.galleries.search(name, body.caption, body.k, body.rerank)
