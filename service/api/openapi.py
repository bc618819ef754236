"""OpenAPI for routes that read their own body (JSON or multipart)."""

from __future__ import annotations

from pydantic import BaseModel


def image_body(model: type[BaseModel], list_field: str, form_name: str) -> dict:
    """A requestBody with the JSON schema of `model` and its multipart equivalent."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    props = schema["properties"]
    form_props = {k: v for k, v in props.items() if k not in ("image", list_field)}
    form_props["image"] = {"type": "string", "format": "binary", "description": "the image file"}
    form_props[form_name] = {
        "type": "array",
        "items": props[list_field]["items"],
        "description": f"one field per item, {props[list_field].get('maxItems')} at most",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image", form_name],
                        "properties": form_props,
                    },
                    "encoding": {form_name: {"style": "form", "explode": True}},
                },
            },
        }
    }
