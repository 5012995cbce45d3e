# Yilian FHIR gateway. Build: docker build -t yilian .   Run: docker run -p 8000:8000 yilian
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    YILIAN_DATABASE_URL=sqlite:////data/yilian.db \
    YILIAN_BASE_URL=http://127.0.0.1:8000/fhir

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY migrations ./migrations
COPY fhir_profiles ./fhir_profiles
COPY mappings ./mappings
RUN pip install -e . \
    && useradd --create-home --uid 10001 yilian \
    && mkdir -p /data && chown yilian /data

USER yilian
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"

# Migrate, then serve; with PostgreSQL set YILIAN_DATABASE_URL and scale --workers.
CMD ["sh", "-c", "yilian db upgrade && yilian serve --host 0.0.0.0 --port 8000 --workers 2"]
