# One image for both parts of the service; the command picks the part (docker-compose.yml runs both):
#   web (the default):  gunicorn -c gunicorn_conf.py run_web_server:app
#   model worker:       python run_model_server.py
#
#   docker build -t keras-rest-api:1 .                                  web + worker, TensorFlow with CUDA
#   docker build -t keras-rest-api:1-cpu --build-arg TENSORFLOW=cpu .   web + worker, TensorFlow + OpenVINO (CPU)
#   docker build -t keras-rest-api-web:1 --build-arg TENSORFLOW=none .  web only: requirements-web.txt, no TensorFlow
#
# No model weights are fetched at build time: mount them and point MODEL_WEIGHTS at the file (see
# docker-compose.yml and the README's "Offline" section); models/imagenet_class_index.json ships in the image.
FROM python:3.11-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The service runs as this user; the code stays root's, read-only to it. Its home holds Keras' cache.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app

WORKDIR /app

# Dependencies first, each in its own layer, so that a change to the code rebuilds neither.
COPY requirements-web.txt requirements.txt ./
RUN pip install -r requirements-web.txt

# cuda: TensorFlow with NVIDIA's CUDA and cuDNN wheels (the host needs only the driver and the NVIDIA
# container toolkit); cpu: TensorFlow and OpenVINO (MODEL_RUNTIME=auto serves on OpenVINO where there is no
# GPU: 1.3-7 x TensorFlow's images/s on the CPUs in BENCHMARKS.md); none: a web-only image. The pins are
# requirements.txt's "Model worker" lines; the count check fails the build if one is missing.
ARG TENSORFLOW=cuda
RUN case "$TENSORFLOW" in \
      none) exit 0 ;; \
      cpu) extra=""; pins="tensorflow|keras|h5py|openvino|openvino-telemetry" ;; \
      cuda) extra="[and-cuda]"; pins="tensorflow|keras|h5py" ;; \
      *) echo "TENSORFLOW must be cuda, cpu or none, not $TENSORFLOW" >&2; exit 1 ;; \
    esac \
    && grep -E "^(${pins})==" requirements.txt | sed "s/^tensorflow==/tensorflow${extra}==/" > /tmp/worker.txt \
    && [ "$(wc -l < /tmp/worker.txt)" -eq "$(echo "$pins" | tr "|" "\n" | wc -l)" ] \
    && pip install -r /tmp/worker.txt \
    && rm /tmp/worker.txt

# MODEL_CACHE_DIR's default for this user: OpenVINO's converted and compiled model, so a restart does neither
# again. Made here, the app user's, so that a volume mounted on it (docker-compose.yml) starts writable.
RUN install -d -o app -g app /home/app/.cache/keras-rest-api

COPY . .

USER 10001:10001
# In a container the web server must listen on every interface to be reached through the published port.
ENV WEB_HOST=0.0.0.0 \
    WEB_PORT=5000 \
    KERAS_HOME=/home/app/.keras
EXPOSE 5000

# The web process is up (whether a model worker is, is /readyz's question). The model worker serves no
# HTTP: docker-compose.yml turns this check off for it. /healthz waits for a free gunicorn thread like any
# request, and under overload with stalled workers every thread may wait up to the longest a request can take
# (15 s by default): the timeout outlasts that, so an overloaded web is not taken for a dead one.
HEALTHCHECK --interval=10s --timeout=20s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import settings, stack, urllib.request as r; r.urlopen(stack.web_url(settings.WEB_HOST, settings.WEB_PORT) + 'healthz', timeout=18)"]

CMD ["gunicorn", "-c", "gunicorn_conf.py", "run_web_server:app"]
