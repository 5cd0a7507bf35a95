FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY opentrack ./opentrack
COPY ingest ./ingest
COPY streams ./streams
COPY warehouse ./warehouse
COPY dashboards ./dashboards
RUN pip install --no-cache-dir .
ENV OPENTRACK_DATA_DIR=/var/lib/opentrack
EXPOSE 8000 9100
CMD ["opentrack", "run"]
