# The Idios image: the same code runs `serve` (embedded), `api` and `worker`.
# torch is not in it: models are exported beforehand (scripts/export_model.py) and mounted under /app/models.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IDIOS_HOST=0.0.0.0 \
    IDIOS_DATA_DIR=/data \
    IDIOS_MODELS_DIR=/app/models

WORKDIR /app
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install --no-cache-dir -r requirements/runtime.txt
COPY idios idios
COPY models models
COPY scripts scripts

RUN useradd --system --uid 10001 idios && mkdir -p /data && chown idios /data
USER idios
VOLUME ["/data"]
EXPOSE 4213 4214

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:4213/ping', timeout=4)" || exit 1

ENTRYPOINT ["python", "-m", "idios"]
CMD ["serve"]
