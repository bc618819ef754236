# The VQA service: `vqa serve` on port 8000 with the model store baked in.
#
#   docker build -t vqa-service .                                   # CPU torch (default)
#   docker build --build-arg TORCH_INDEX= -t vqa-service:cuda .     # PyPI's default CUDA torch
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                -t vqa-service:cu128 .                             # a chosen CUDA build
#   docker build --build-arg EXTRAS=ray -t vqa-service:ray .        # with Ray Serve
#   docker run -p 8000:8000 vqa-service                             # add --gpus all for CUDA
FROM python:3.11-slim

# Where torch and torchvision come from: the CPU wheels by default; empty takes PyPI's
# build (CUDA on linux x86_64); any other index URL takes that index's build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Optional extras of pyproject.toml to install too, comma-separated (e.g. "ray").
ARG EXTRAS=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN groupadd --gid 10001 vqa && useradd --uid 10001 --gid vqa --create-home vqa \
 && mkdir /data && chown vqa:vqa /data

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e.strip() for e in os.environ.get('EXTRAS', '').split(',') if e.strip()]; \
print(*project['dependencies'], *(d for e in extras for d in project['optional-dependencies'][e]), sep='\n')" > requirements.txt \
 && if [ -n "$TORCH_INDEX" ]; then pip install --index-url "$TORCH_INDEX" $(grep -E '^torch(vision)?==' requirements.txt); fi \
 && pip install -r requirements.txt \
 && rm requirements.txt

# Then the code, installed without touching the dependencies.
COPY README.md ./
COPY service ./service
RUN pip install --no-deps . && rm -rf build *.egg-info

# The shipped models; mount another store over /app/model_store to serve those instead.
COPY model_store ./model_store

USER 10001:10001
ENV VQA_STORE=/app/model_store \
    VQA_DATA_DIR=/data
VOLUME ["/app/model_store", "/data"]

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"
CMD ["vqa", "serve", "--host", "0.0.0.0", "--port", "8000"]
