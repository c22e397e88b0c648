# syntax=docker/dockerfile:1
# Build stage: install the locked dependencies and the gateway into a virtualenv.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN pip install --no-deps .

# Runtime stage: the virtualenv, the migrations, a non-root user.
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 GATEWAY_DATA_DIR=/data
RUN useradd --system --uid 10001 --home-dir /data --create-home gateway
COPY --from=build /opt/venv /opt/venv
# The installed package has no migrations beside it: app/migrate.py then looks in the
# working directory, so they live here, in the WORKDIR.
WORKDIR /srv
COPY alembic.ini ./
COPY migrations ./migrations
USER gateway
EXPOSE 8000
# SIGTERM: stop claiming, finish or cancel in-flight work within GATEWAY_SHUTDOWN_GRACE_S
# (8 s), give the leases back, exit 0. Give `docker stop -t` / stop_grace_period /
# terminationGracePeriodSeconds a few seconds more than that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"
CMD ["sh", "-c", "headshot-gateway migrate && exec headshot-gateway serve --host 0.0.0.0 --port 8000"]
